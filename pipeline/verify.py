"""Integrity checks of a record store: schema, completeness, block checksums, finite values."""
from __future__ import annotations

import numpy as np

from .fingerprint import SCHEMA_VERSION
from .store import RECORD_FIELDS, SPLITS, STORE_SCHEMA, RecordStore, block_checksum

FLOAT_FIELDS = tuple(f for f in RECORD_FIELDS if f != "label")


def verify_store(store: RecordStore, check_values: bool = True, progress=None) -> list[str]:
    """Problems found in `store`, each naming the split and block at fault; empty when sound."""
    attrs = store.attrs
    if attrs.get("store_schema") != STORE_SCHEMA or attrs.get("schema_version") != SCHEMA_VERSION:
        return [
            f"schema {attrs.get('store_schema')}/{attrs.get('schema_version')} "
            f"is not {STORE_SCHEMA}/{SCHEMA_VERSION}"
        ]
    problems: list[str] = []
    if not attrs.get("complete", False):
        problems.append("store is incomplete (stage one did not finish; rerun `ocd overfit` to finish it)")
    for split in SPLITS:
        try:
            done = store.done_mask(split)
            checksums = store.read(split, "checksum")
        except Exception as exc:  # a damaged metadata or index chunk: report it, don't crash
            problems.append(f"{split}: cannot read the done mask or checksums ({type(exc).__name__})")
            continue
        for block in range(len(done)):
            if not done[block]:
                problems.append(f"{split} block {block}: not finished")
                continue
            try:
                records = store.read_block(split, block)
            except Exception as exc:  # codec errors on corrupted chunks come in many types
                problems.append(f"{split} block {block}: unreadable chunk ({type(exc).__name__}: {exc})")
                continue
            if block_checksum(records) != int(checksums[block]):
                problems.append(f"{split} block {block}: checksum mismatch (corrupted or missing chunk)")
            elif check_values:
                for name in FLOAT_FIELDS:
                    if not np.isfinite(records[name]).all():
                        problems.append(f"{split} block {block}: non-finite values in {name}")
            if progress is not None:
                progress()
    return problems
