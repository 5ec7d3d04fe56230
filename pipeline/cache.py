"""The on-disk cache: one directory per (stage, key), published atomically.

Layout: ``<root>/<stage>/<key>/`` holding the stage's artefacts and ``meta.json``. A finished
entry always has ``meta.json``; work in progress lives in ``<root>/<stage>/<key>.partial/`` and
is renamed into place only when complete, so a killed run never leaves a half-written entry
under a final key. A per-entry lock file stops two processes from writing the same entry.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock

from .errors import OcdError

META = "meta.json"


@dataclass(frozen=True)
class Entry:
    """A finished cache entry."""

    stage: str
    key: str
    path: Path
    meta: dict[str, Any]


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to `path` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


class Cache:
    """A cache rooted at a directory (default ``data/``)."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def ensure_writable(self) -> None:
        """Create the root if needed; a clear error when it cannot be written."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-probe-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise OcdError(f"cache directory {self.root} is not writable: {exc.strerror or exc}") from None

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def partial_path(self, stage: str, key: str) -> Path:
        return self.root / stage / f"{key}.partial"

    def lookup(self, stage: str, key: str) -> Entry | None:
        """The finished entry for (stage, key), or None."""
        path = self.path(stage, key)
        meta_file = path / META
        if not meta_file.is_file():
            return None
        return Entry(stage, key, path, json.loads(meta_file.read_text()))

    @contextlib.contextmanager
    def lock(self, stage: str, key: str) -> Iterator[None]:
        """Exclusive lock on one entry; refuses at once if another process holds it."""
        self.ensure_writable()
        (self.root / stage).mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(self.root / stage / f"{key}.lock"))
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            raise OcdError(
                f"another ocd process is writing {stage}/{key} (lock held); retry when it finishes"
            ) from None
        try:
            yield
        finally:
            lock.release()

    def begin(self, stage: str, key: str, *, fresh: bool = False) -> Path:
        """The partial directory for building (stage, key); `fresh` discards earlier progress."""
        partial = self.partial_path(stage, key)
        if fresh and partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
        return partial

    def publish(self, stage: str, key: str, meta: dict[str, Any]) -> Entry:
        """Write meta.json into the partial directory and rename it into place."""
        partial = self.partial_path(stage, key)
        final = self.path(stage, key)
        meta = {"stage": stage, "key": key, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **meta}
        write_json_atomic(partial / META, meta)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        return Entry(stage, key, final, meta)

    def remove(self, stage: str, key: str) -> None:
        for path in (self.path(stage, key), self.partial_path(stage, key)):
            if path.exists():
                shutil.rmtree(path)

    def entries(self) -> Iterator[tuple[str, str, Path, dict[str, Any] | None]]:
        """Every entry on disk, finished or not: (stage, key, path, meta or None)."""
        if not self.root.is_dir():
            return
        for stage_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for path in sorted(p for p in stage_dir.iterdir() if p.is_dir()):
                key = path.name.removesuffix(".partial")
                meta = None if path.name.endswith(".partial") else self.lookup(stage_dir.name, key)
                yield stage_dir.name, key, path, meta.meta if meta else None


def dir_size(path: Path) -> int:
    """Total bytes of the files under `path`."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
