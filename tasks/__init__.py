"""Task registry: built-in tasks by name, user tasks from ``path/to/file.py:function``.

Built-in tasks are registered as import paths and imported only when asked for, so a task with
optional dependencies cannot break the others.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

from ..pipeline.errors import OcdError
from .base import Task

DEFAULT_TASK = "mnist"

REGISTRY: dict[str, str] = {
    "mnist": "ocd.tasks.mnist:mnist_task",
    "digits": "ocd.tasks.digits:digits_task",
    "tabular-regression": "ocd.tasks.tabular:tabular_regression_task",
    "tabular-classification": "ocd.tasks.tabular:tabular_classification_task",
}


def register_task(name: str, factory: str) -> None:
    """Register a task factory given as ``"package.module:function"``."""
    REGISTRY[name] = factory


def task_names() -> list[str]:
    return sorted(REGISTRY)


def _call_factory(factory: Callable[[], Task], origin: str) -> Task:
    task = factory()
    if not isinstance(task, Task):
        raise OcdError(f"{origin} returned {type(task).__name__}, not an ocd Task")
    return task


def _load_from_file(spec: str) -> Task:
    path_text, _, func_name = spec.rpartition(":")
    path = Path(path_text)
    if not path.is_file():
        raise OcdError(f"task file not found: {path}")
    module_name = f"ocd_user_task_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise OcdError(f"cannot import task file {path}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # lets Dask workers and pickling find it
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # a user's file may raise anything while importing
        raise OcdError(f"task file {path} failed to import: {type(exc).__name__}: {exc}") from None
    factory = getattr(module, func_name, None)
    if not callable(factory):
        raise OcdError(f"task file {path} has no function {func_name!r}")
    return _call_factory(factory, f"{path}:{func_name}")


def get_task(spec: str) -> Task:
    """A task by registry name or ``path/to/file.py:function``."""
    if spec in REGISTRY:
        module_name, _, func_name = REGISTRY[spec].partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise OcdError(f"task {spec!r} needs a missing package: {exc.name or exc}") from None
        return _call_factory(getattr(module, func_name), spec)
    if ".py:" in spec:
        return _load_from_file(spec)
    raise OcdError(f"unknown task {spec!r} (known: {', '.join(task_names())}; or path/to/file.py:function)")


__all__ = ["DEFAULT_TASK", "REGISTRY", "Task", "get_task", "register_task", "task_names"]
