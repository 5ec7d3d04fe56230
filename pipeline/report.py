"""Printing a stage's summary: a Rich table, or one JSON object on stdout."""
from __future__ import annotations

import json
import math
from typing import Any

from rich.console import Console
from rich.table import Table

from .context import StageResult


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{name}."))
        else:
            out[name] = v
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isfinite(value) and value != 0 and (abs(value) >= 1e7 or abs(value) < 1e-3):
            return f"{value:.3e}"
        if abs(value) >= 100:
            return f"{value:,.1f}"
        return f"{value:.4f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def emit(result: StageResult, as_json: bool, console: Console | None = None) -> None:
    """Print `result` as JSON (stdout, one object) or as a summary table."""
    if as_json:
        print(json.dumps(result.to_json(), default=str))
        return
    console = console or Console()
    table = Table(title=f"ocd {result.stage}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    rows = {"key": result.key, "path": str(result.path), "cached": result.cached, **flatten(result.summary)}
    rows.update(flatten(result.metrics, "metrics."))
    for name, value in rows.items():
        if value is not None and not isinstance(value, (list, tuple)):
            table.add_row(name, _fmt(value))
    console.print(table)


def evaluation_table(result: StageResult, console: Console | None = None) -> None:
    """Methods as rows, metrics as columns, and the paired loss change against the base."""
    console = console or Console()
    metrics = result.metrics
    names = list(next(iter(metrics.values())))
    table = Table(title=f"ocd evaluate ({result.key}{', cached' if result.cached else ''})")
    table.add_column("method", style="bold")
    for name in names:
        table.add_column(name, justify="right")
    table.add_column("loss vs base [95% CI]", justify="right")
    paired = result.summary.get("paired_vs_base", {})
    for method, values in metrics.items():
        diff = paired.get(method, {}).get("loss")
        cell = "" if diff is None else f"{diff['mean']:+.4f} [{diff['ci_low']:+.4f}, {diff['ci_high']:+.4f}]"
        table.add_row(method, *(_fmt(values[n]) for n in names), cell)
    console.print(table)
