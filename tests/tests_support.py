"""Helpers shared by tests: a user task defined in its own file."""
from __future__ import annotations

import textwrap
from pathlib import Path

USER_TASK = textwrap.dedent(
    """
    import datasets, numpy as np
    from torch import nn
    from ocd.tasks.base import Task, make_split
    from ocd.pipeline.metrics import regression_metrics, squared_error

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
            self.head = nn.Linear(8, 1)
        def forward(self, x):
            return self.head(self.body(x)).squeeze(-1)

    def load(cache_dir):
        rng = np.random.default_rng(1)
        x = rng.normal(size=(160, 5)).astype("float32")
        y = (x @ np.arange(5) / 5 + 0.1 * rng.normal(size=160)).astype("float32")
        return datasets.DatasetDict(train=make_split(x[:120], y[:120]), test=make_split(x[120:], y[120:]))

    def my_task():
        return Task(name="user-linear", load_data=load, build_model=Net, layer="body.0",
                    loss=squared_error, metrics=regression_metrics,
                    defaults={"base": {"epochs": 20, "lr": 1e-2}, "overfit": {"steps": 3, "lr": 1e-2}})
    """
)


def write_user_task(directory: Path) -> Path:
    """Write the user task file into `directory`; returns its path (factory: my_task)."""
    path = directory / "my_task.py"
    path.write_text(USER_TASK)
    return path


def ocd_command(*args) -> list[str]:
    """argv that runs the ocd CLI of this interpreter in a subprocess."""
    import sys

    return [sys.executable, "-m", "ocd", *map(str, args)]


def wait_for(predicate, timeout: float = 120.0, interval: float = 0.05) -> bool:
    """Poll `predicate` until it is true or `timeout` seconds pass."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except Exception:  # the watched files may be half-created; try again
            pass
        time.sleep(interval)
    return False
