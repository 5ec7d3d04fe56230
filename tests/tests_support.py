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


def start_dask_cluster(directory: Path, workers: int = 2, nanny: bool = True):
    """A real `dask scheduler` and `dask worker` processes on loopback: (address, scheduler, workers)."""
    import json
    import os
    import subprocess
    import sys

    dask = str(Path(sys.executable).with_name("dask"))
    scheduler_file = directory / "scheduler.json"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": {**os.environ, "OMP_NUM_THREADS": "1"}}
    scheduler = subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                  "--scheduler-file", str(scheduler_file)], **quiet)
    if not wait_for(scheduler_file.exists, 60):
        scheduler.terminate()
        raise RuntimeError("dask scheduler did not start")
    address = json.loads(scheduler_file.read_text())["address"]
    extra = [] if nanny else ["--no-nanny"]
    procs = [subprocess.Popen([dask, "worker", address, "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1",
                               *extra], **quiet) for _ in range(workers)]
    from distributed import Client

    with Client(address, timeout="30s") as client:
        client.wait_for_workers(workers, timeout=90)
    return address, scheduler, procs


def stop_processes(*procs) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        proc.wait(timeout=30)
