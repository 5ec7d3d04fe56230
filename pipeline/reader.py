"""Streaming a split of a record store into PyTorch, never holding all of it in memory.

Each epoch visits the split's blocks (= Zarr chunks) in a seeded random order, deals them out to
DataLoader workers round-robin, and passes the records through a bounded shuffle buffer. Every
record is yielded exactly once per epoch. The store is opened lazily inside each worker process,
so workers are safe with zarr's background event loop when started with spawn or forkserver.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .store import RecordStore


class StoreStream(IterableDataset):
    """Records of one split as dicts of tensors (one sample each)."""

    def __init__(
        self,
        url: str,
        split: str,
        fields: tuple[str, ...],
        *,
        shuffle: bool = True,
        buffer_size: int = 1024,
        seed: int = 0,
    ):
        super().__init__()
        self.url, self.split, self.fields = url, split, tuple(fields)
        self.shuffle, self.buffer_size, self.seed = shuffle, buffer_size, seed
        self.epoch = 0
        self._store: RecordStore | None = None

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch: its block order and buffer shuffling follow from (seed, epoch)."""
        self.epoch = epoch

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_store"] = None  # never ship an open store to a worker process
        return state

    @property
    def store(self) -> RecordStore:
        if self._store is None:
            self._store = RecordStore.open(self.url)
        return self._store

    def __len__(self) -> int:
        return self.store.size(self.split)

    def block_order(self) -> list[int]:
        n_blocks = len(self.store.blocks(self.split))
        if not self.shuffle:
            return list(range(n_blocks))
        return [int(b) for b in np.random.default_rng([self.seed, self.epoch]).permutation(n_blocks)]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        blocks = self.block_order()[worker::n_workers]
        rng = np.random.default_rng([self.seed, self.epoch, worker, 1])
        buffer: list[dict[str, torch.Tensor]] = []
        for block in blocks:
            records = self.store.read_block(self.split, block, self.fields)
            n = len(next(iter(records.values())))
            for i in range(n):
                buffer.append({name: torch.from_numpy(np.asarray(records[name][i])) for name in self.fields})
                if self.shuffle and len(buffer) >= self.buffer_size:
                    yield buffer.pop(int(rng.integers(len(buffer))))
                elif not self.shuffle:
                    yield buffer.pop()
        if self.shuffle:
            rng.shuffle(buffer)
        yield from buffer


def stream_loader(stream: StoreStream, batch_size: int, num_workers: int = 0) -> DataLoader:
    """A DataLoader over `stream`; worker processes (if any) start with forkserver."""
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs = {"multiprocessing_context": "forkserver", "persistent_workers": False}
    return DataLoader(stream, batch_size=batch_size, num_workers=num_workers, **kwargs)
