"""Checks and conversions of a task's splits."""
from __future__ import annotations

import datasets
import numpy as np
import torch

from .errors import OcdError
from .fingerprint import array_fingerprint

SPLITS = ("train", "test")


def validate_splits(splits: datasets.DatasetDict, task_name: str) -> datasets.DatasetDict:
    """The splits must be {"train", "test"} with columns input and label and finite inputs."""
    if not isinstance(splits, (datasets.DatasetDict, dict)):
        raise OcdError(f"task {task_name}: load_data must return a datasets.DatasetDict")
    for split in SPLITS:
        if split not in splits:
            raise OcdError(f"task {task_name}: data has no {split!r} split")
        ds = splits[split]
        missing = {"input", "label"} - set(ds.column_names)
        if missing:
            raise OcdError(f"task {task_name}: {split} split lacks column(s) {sorted(missing)}")
        if len(ds) == 0:
            raise OcdError(f"task {task_name}: {split} split is empty")
        inputs, _ = split_arrays(ds)
        if not torch.isfinite(inputs).all():
            bad = int((~torch.isfinite(inputs.reshape(len(inputs), -1))).any(dim=1).nonzero()[0, 0])
            raise OcdError(f"task {task_name}: {split} sample {bad} has non-finite input values")
    return splits


def split_arrays(ds: datasets.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All inputs and labels of a split as tensors."""
    table = ds.with_format("numpy")[:]
    inputs = torch.from_numpy(np.ascontiguousarray(table["input"], dtype=np.float32))
    labels = torch.from_numpy(np.ascontiguousarray(table["label"]))
    return inputs, labels


def data_fingerprint(splits: datasets.DatasetDict) -> str:
    """A hash of every split's inputs and labels."""
    arrays = []
    for split in SPLITS:
        inputs, labels = split_arrays(splits[split])
        arrays += [inputs.numpy(), labels.numpy()]
    return array_fingerprint(*arrays)
