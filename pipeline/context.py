"""What every stage receives: the task, the cache, the device and where to report progress."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ..tasks import Task, get_task
from .cache import Cache
from .data import data_fingerprint
from .errors import OcdError


def resolve_device(name: str) -> torch.device:
    """A torch device from a name; ``auto`` picks an accelerator when one is present."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise OcdError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OcdError("device 'cuda' requested but no CUDA device is available")
    return device


@dataclass
class Context:
    """The shared state of one command."""

    task_spec: str
    cache: Cache
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    console: Console = field(default_factory=lambda: Console(stderr=True))
    show_progress: bool = True

    @functools.cached_property
    def task(self) -> Task:
        return get_task(self.task_spec)

    @functools.cached_property
    def splits(self) -> datasets.DatasetDict:
        return self.task.data(self.cache.root)

    @functools.cached_property
    def data_fingerprint(self) -> str:
        return data_fingerprint(self.splits)

    def progress(self) -> Progress:
        """A Rich progress display on stderr (disabled when progress is off)."""
        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            disable=not self.show_progress,
            transient=False,
        )

    def say(self, message: str) -> None:
        self.console.print(message, highlight=False)


@dataclass
class StageResult:
    """What a stage command reports: printed as a table, or as JSON with ``--json``."""

    stage: str
    key: str
    path: Path
    cached: bool
    metrics: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "key": self.key,
            "path": str(self.path),
            "cached": self.cached,
            "metrics": self.metrics,
            **self.summary,
        }
