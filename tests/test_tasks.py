"""Task registry, user task files and deterministic splits."""
from __future__ import annotations

import numpy as np
import pytest
from tests_support import write_user_task

from ocd.pipeline.data import data_fingerprint, split_arrays
from ocd.pipeline.errors import OcdError
from ocd.tasks import Task, get_task, task_names


@pytest.fixture
def user_task_file(tmp_path):
    return write_user_task(tmp_path)


def test_builtin_tasks_are_registered():
    assert {"mnist", "digits"} <= set(task_names())
    task = get_task("digits")
    assert isinstance(task, Task)
    assert task.build_model().get_submodule(task.layer) is not None


def test_unknown_task_is_a_clear_error():
    with pytest.raises(OcdError, match="unknown task 'nope'"):
        get_task("nope")


def test_user_task_file(user_task_file):
    task = get_task(f"{user_task_file}:my_task")
    assert task.name == "user-linear"
    with pytest.raises(OcdError, match="has no function"):
        get_task(f"{user_task_file}:missing")
    with pytest.raises(OcdError, match="not found"):
        get_task("/nonexistent/task.py:my_task")


def test_splits_are_deterministic_and_disjoint(tmp_path):
    task = get_task("digits")
    a, b = task.data(tmp_path), task.data(tmp_path)
    assert data_fingerprint(a) == data_fingerprint(b)
    x_train, y_train = split_arrays(a["train"])
    x_test, _ = split_arrays(a["test"])
    assert len(x_train) == 1497 and len(x_test) == 300
    train_rows = {row.tobytes() for row in x_train.numpy()}
    overlap = sum(row.tobytes() in train_rows for row in x_test.numpy())
    assert overlap < 5  # sklearn's digits has a few exact duplicates, but the split is disjoint by index
    assert len(np.unique(y_train.numpy())) == 10


def test_mnist_split_is_balanced_enough(tmp_path):
    splits = get_task("mnist").data(tmp_path)
    _, y_test = split_arrays(splits["test"])
    counts = np.bincount(y_test.numpy(), minlength=10)
    assert len(y_test) == 1000 and counts.min() > 60
    assert (tmp_path / "raw" / "mnist" / "x.npy").is_file()


def test_non_finite_inputs_are_rejected(tmp_path):
    import datasets

    from ocd.tasks.base import make_split

    x = np.ones((4, 3), dtype=np.float32)
    x[2, 1] = np.nan
    bad = Task(
        name="bad",
        load_data=lambda _: datasets.DatasetDict(train=make_split(x, np.zeros(4)), test=make_split(x, np.zeros(4))),
        build_model=lambda: None,
        layer="x",
        loss=None,
        metrics=None,
    )
    with pytest.raises(OcdError, match="sample 2 has non-finite"):
        bad.data(tmp_path)
