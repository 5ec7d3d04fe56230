"""scikit-learn's 8x8 digits and a small MLP: the fast task for tests."""
from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
from torch import nn

from ..pipeline.metrics import (
    CLASSIFICATION_DIRECTIONS,
    classification_metrics,
    cross_entropy,
    log_mean_softmax,
)
from .base import Task, make_split, seeded_split

SPLIT_SEED = 0
N_TEST = 300


def digits_model() -> nn.Sequential:
    """64 -> 32 -> 16 -> 10 MLP; layer "2" (32 -> 16) is overfitted."""
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10))


def load_digits_splits(cache_dir: Path) -> datasets.DatasetDict:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data.astype(np.float32) / 16.0 - 0.5) / 0.5
    y = bunch.target.astype(np.int64)
    train_idx, test_idx = seeded_split(len(x), N_TEST, SPLIT_SEED)
    return datasets.DatasetDict(
        train=make_split(x[train_idx], y[train_idx]), test=make_split(x[test_idx], y[test_idx])
    )


def digits_task() -> Task:
    return Task(
        name="digits",
        description="scikit-learn 8x8 digits (1,797), small MLP, overfit its middle Linear (32->16)",
        load_data=load_digits_splits,
        build_model=digits_model,
        layer="2",
        loss=cross_entropy,
        metrics=classification_metrics,
        combine_outputs=log_mean_softmax,
        lower_is_better=CLASSIFICATION_DIRECTIONS,
        defaults={"base": {"epochs": 30, "batch_size": 64, "lr": 3e-3}, "overfit": {"steps": 3, "lr": 1e-2}},
    )
