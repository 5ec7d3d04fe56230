"""Where stage one's blocks run: in-process, on a local Dask cluster, or on any Dask scheduler."""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .errors import OcdError


@dataclass(frozen=True)
class ClusterConfig:
    """How to run the blocks (none of this changes the results)."""

    workers: int | None = None  #: local worker processes; None = one per core / threads; 0 = in-process
    threads_per_worker: int = 1  #: threads (and torch threads) per worker
    scheduler: str | None = None  #: address of an existing Dask scheduler, e.g. tcp://10.0.0.1:8786
    retries: int = 2  #: times a block is retried after its worker died

    def resolved_workers(self) -> int:
        if self.workers is not None:
            return self.workers
        return max(1, (os.cpu_count() or 1) // max(1, self.threads_per_worker))


class Executor:
    """Runs a function over jobs, yielding results as they complete."""

    def __init__(self, client: Any | None, retries: int = 0):
        self.client = client
        self.retries = retries

    @property
    def dashboard_link(self) -> str | None:
        return getattr(self.client, "dashboard_link", None) if self.client is not None else None

    def map_unordered(self, fn: Callable[[Any], Any], jobs: Iterable[Any], names: Iterable[str]) -> Iterator[Any]:
        jobs = list(jobs)
        if self.client is None:
            for job in jobs:
                yield fn(job)
            return
        from distributed import as_completed

        futures = [
            self.client.submit(fn, job, key=name, pure=False, retries=self.retries)
            for job, name in zip(jobs, names, strict=True)
        ]
        try:
            for future in as_completed(futures):
                yield future.result()
        finally:
            for future in futures:
                future.cancel()


@contextlib.contextmanager
def open_executor(cfg: ClusterConfig) -> Iterator[Executor]:
    """An executor for `cfg`: a Dask client (local cluster or remote scheduler) or in-process."""
    if cfg.scheduler:
        from distributed import Client

        try:
            client = Client(cfg.scheduler, timeout="10s")
        except OSError as exc:
            raise OcdError(f"cannot reach Dask scheduler {cfg.scheduler}: {exc}") from None
        with client:
            yield Executor(client, cfg.retries)
        return
    workers = cfg.resolved_workers()
    if workers == 0:
        yield Executor(None)
        return
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=cfg.threads_per_worker,
            processes=True,
            dashboard_address=":0",
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield Executor(client, cfg.retries)
