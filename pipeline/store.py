"""The Zarr v3 record store of stage one.

Layout (one group per split, every array chunked along the sample axis with one chunk per block)::

    store.zarr/                      attrs: provenance (schema, task, base key, layer, optimizer, ...)
      train/ test/                   attrs: n, block_size, n_blocks
        input label act_in act_out output delta loss_before loss_after   (N, ...)
        done      (n_blocks,) bool    a block's flag, set after its data, checksum and moments
        checksum  (n_blocks,) uint64  blake2b-64 of the block's records, in RECORD_FIELDS order
        moments   (n_blocks, F, 2) float64  per field: sum and sum of squares over the block

A block is written by exactly one task and owns whole chunks of every array (chunks of
``done`` and ``checksum`` hold one element), so concurrent writers never touch the same chunk.
"""
from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
import zarr.codecs

from .errors import OcdError

RECORD_FIELDS = ("input", "label", "act_in", "act_out", "output", "delta", "loss_before", "loss_after")
SPLITS = ("train", "test")
STORE_SCHEMA = 1


def make_codecs(name: str) -> Any:
    """Compressor list for a codec name."""
    codecs = {
        "none": None,
        "blosc-lz4": [zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")],
        "zstd": [zarr.codecs.ZstdCodec(level=3)],
    }
    if name not in codecs:
        raise OcdError(f"unknown codec {name!r} (known: {', '.join(codecs)})")
    return codecs[name]


def block_checksum(records: dict[str, np.ndarray]) -> int:
    """A 64-bit checksum of one block's records (dtype, shape and bytes of each field)."""
    h = hashlib.blake2b(digest_size=8)
    for name in RECORD_FIELDS:
        a = np.ascontiguousarray(records[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.data)
    return int.from_bytes(h.digest(), "little")


def block_moments(records: dict[str, np.ndarray]) -> np.ndarray:
    """(F, 2): the sum and the sum of squares of each record field over a block, in float64."""
    out = np.zeros((len(RECORD_FIELDS), 2))
    for i, name in enumerate(RECORD_FIELDS):
        values = np.ascontiguousarray(records[name]).ravel()
        if values.dtype.kind != "f":
            values = values.astype(np.float64)
        out[i] = values.sum(dtype=np.float64), float(np.dot(values, values))
    return out


@dataclass(frozen=True)
class FieldSpec:
    """Per-sample shape and dtype of one record field."""

    shape: tuple[int, ...]
    dtype: str


def block_bounds(n: int, block_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + block_size, n)) for start in range(0, n, block_size)]


class RecordStore:
    """A stage-one store at a local path or fsspec URL."""

    def __init__(self, group: zarr.Group, url: str):
        self.group = group
        self.url = url
        self._arrays: dict[tuple[str, str], zarr.Array] = {}
        self._groups: dict[str, zarr.Group] = {}

    def array(self, split: str, name: str) -> zarr.Array:
        """An array of a split, opened once (each lookup would otherwise reread its metadata)."""
        key = (split, name)
        if key not in self._arrays:
            self._arrays[key] = self.split(split)[name]
        return self._arrays[key]

    # -- creation and opening -------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        url: str,
        sizes: dict[str, int],
        fields: dict[str, FieldSpec],
        block_size: int,
        codec: str,
        attrs: dict[str, Any],
    ) -> RecordStore:
        """A new, empty store (nothing done)."""
        compressors = make_codecs(codec)
        root = zarr.open_group(url, mode="w", zarr_format=3)
        root.attrs.update({**attrs, "store_schema": STORE_SCHEMA, "complete": False, "codec": codec})
        for split, n in sizes.items():
            group = root.create_group(split)
            n_blocks = len(block_bounds(n, block_size))
            group.attrs.update({"n": n, "block_size": block_size, "n_blocks": n_blocks})
            for name in RECORD_FIELDS:
                spec = fields[name]
                group.create_array(
                    name,
                    shape=(n, *spec.shape),
                    dtype=spec.dtype,
                    chunks=(block_size, *spec.shape),
                    compressors=compressors,
                    fill_value=0,
                    config={"write_empty_chunks": True},
                )
            group.create_array("done", shape=(n_blocks,), dtype="bool", chunks=(1,), fill_value=False)
            group.create_array("checksum", shape=(n_blocks,), dtype="uint64", chunks=(1,), fill_value=0)
            group.create_array(
                "moments", shape=(n_blocks, len(RECORD_FIELDS), 2), dtype="float64",
                chunks=(1, len(RECORD_FIELDS), 2), fill_value=0.0,
            )
        return cls(root, url)

    @classmethod
    def open(cls, url: str, mode: str = "r") -> RecordStore:
        try:
            root = zarr.open_group(url, mode=mode, zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError, ValueError) as exc:
            raise OcdError(f"no ocd record store at {url}: {exc}") from None
        if root.attrs.get("store_schema") != STORE_SCHEMA:
            raise OcdError(f"{url} is not an ocd record store of schema {STORE_SCHEMA}")
        return cls(root, url)

    # -- properties -----------------------------------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    @property
    def complete(self) -> bool:
        return bool(self.group.attrs.get("complete", False))

    def split(self, split: str) -> zarr.Group:
        if split not in self._groups:
            self._groups[split] = self.group[split]
        return self._groups[split]

    def size(self, split: str) -> int:
        return int(self.split(split).attrs["n"])

    def blocks(self, split: str) -> list[tuple[int, int]]:
        group = self.split(split)
        return block_bounds(int(group.attrs["n"]), int(group.attrs["block_size"]))

    def done_mask(self, split: str) -> np.ndarray:
        return np.asarray(self.array(split, "done")[:], dtype=bool)

    def missing_blocks(self, split: str) -> list[int]:
        return [int(i) for i in np.flatnonzero(~self.done_mask(split))]

    # -- block I/O -----------------------------------------------------------------------------
    def write_block(self, split: str, block: int, records: dict[str, np.ndarray]) -> int:
        """Write one block's records, then its checksum, then its done flag. Returns the checksum."""
        start, stop = self.blocks(split)[block]
        for name in RECORD_FIELDS:
            array = self.array(split, name)
            values = np.asarray(records[name], dtype=array.dtype)
            if values.shape != (stop - start, *array.shape[1:]):
                raise ValueError(f"block {block} of {split}/{name}: shape {values.shape} does not fit")
            array[start:stop] = values
        typed = {n: np.asarray(records[n], dtype=self.array(split, n).dtype) for n in RECORD_FIELDS}
        checksum = block_checksum(typed)
        self.array(split, "checksum")[block] = checksum
        self.array(split, "moments")[block] = block_moments(typed)
        self.array(split, "done")[block] = True
        return checksum

    def read_block(self, split: str, block: int, fields: tuple[str, ...] = RECORD_FIELDS) -> dict[str, np.ndarray]:
        start, stop = self.blocks(split)[block]
        return {name: self.array(split, name)[start:stop] for name in fields}

    def read(self, split: str, name: str) -> np.ndarray:
        """A whole array (for small fields such as losses)."""
        return self.array(split, name)[:]

    def iter_blocks(self, split: str, fields: tuple[str, ...] = RECORD_FIELDS) -> Iterator[dict[str, np.ndarray]]:
        for block in range(len(self.blocks(split))):
            yield self.read_block(split, block, fields)

    # -- finishing --------------------------------------------------------------------------------
    def finalize(self, extra_attrs: dict[str, Any]) -> None:
        """Record the statistics, mark complete and consolidate the metadata."""
        self.group.attrs.update({**extra_attrs, "complete": True})
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            zarr.consolidate_metadata(self.url)
