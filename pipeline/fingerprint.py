"""Stable fingerprints of configs and data: the basis of every cache key."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import numpy as np

SCHEMA_VERSION = 2
"""Bump when the layout of any cached artefact changes: every key changes with it."""


def _canonical(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _canonical(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, np.generic):
        return _canonical(value.item())
    raise TypeError(f"cannot fingerprint a value of type {type(value).__name__}")


def canonical_json(value: Any) -> str:
    """JSON text that is identical for equal values (sorted keys, exact floats)."""
    return json.dumps(_canonical(value), sort_keys=True, separators=(",", ":"))


def cache_key(stage: str, **parts: Any) -> str:
    """A 16-hex-digit key for `stage` determined by every field of `parts` and the schema version."""
    payload = canonical_json({"stage": stage, "schema": SCHEMA_VERSION, **parts})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def array_fingerprint(*arrays: np.ndarray) -> str:
    """Hash of the dtype, shape and bytes of each array, in order."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]
