"""Choosing the layer to overfit: rank the base model's layers by loss entropy (``ocd select-layer``).

The ranking (see :mod:`ocd.pipeline.layer_selection`) uses the cached base model in eval mode and
``cfg.samples`` training samples: the first ones of a permutation of the train split seeded with
``cfg.seed``. It is not cached (LeNet5 with the defaults: about half a minute on two CPU cores).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from rich.table import Table

from ..pipeline.context import Context, StageResult
from ..pipeline.data import split_arrays
from ..pipeline.layer_selection import (
    LayerScore,
    LayerSelectionConfig,
    candidate_layers,
    check_layer,
    rank_layers,
)
from .base import load_base_model

AUTO = "auto"


def selection_samples(ctx: Context, cfg: LayerSelectionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``cfg.samples`` training samples after a permutation seeded with ``cfg.seed``."""
    inputs, labels = split_arrays(ctx.splits["train"])
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(cfg.seed))
    chosen = order[: cfg.samples]
    return inputs[chosen], labels[chosen]


def select_layer(ctx: Context, base_result: StageResult, cfg: LayerSelectionConfig) -> list[LayerScore]:
    """Every Linear/Conv2d layer of the base model scored by loss entropy, highest first."""
    model = load_base_model(ctx, base_result)
    inputs, labels = selection_samples(ctx, cfg)
    layers = candidate_layers(model)
    with ctx.progress() as progress:
        bar = progress.add_task("layer selection", total=cfg.draws * max(len(layers), 1), info="")

        def advance(name: str, count: int) -> None:
            progress.update(bar, advance=count, info=name)

        return rank_layers(model, inputs, labels, ctx.task.loss, cfg, layers=layers, progress=advance)


def resolve_layer(ctx: Context, base_result: StageResult, requested: str, cfg: LayerSelectionConfig) -> str:
    """The layer to overfit: "" -> the task's default, "auto" -> the top-ranked layer, else `requested`.

    A named layer (or the task's default) must be a Linear or Conv2d (groups=1) module of the
    model; otherwise an ``OcdError`` lists the candidates.
    """
    if requested == AUTO:
        scores = select_layer(ctx, base_result, cfg)
        top = scores[0]
        ctx.say(f"layer selection: {top.name} ({top.kind} {_shape(top.shape)}, entropy {_num(top.entropy)})")
        return top.name
    name = requested or ctx.task.layer
    check_layer(ctx.task.build_model(), name)
    return name


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _num(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else str(value)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def ranking_table(scores: list[LayerScore], default_layer: str | None = None) -> Table:
    """The ranking as a Rich table; the chosen (top) layer in bold, the task's default marked."""
    table = Table(title="ocd select-layer: loss entropy under weight perturbations")
    table.add_column("rank", justify="right")
    for column in ("layer", "kind", "weight"):
        table.add_column(column)
    for column in ("entropy", "loss mean", "loss std"):
        table.add_column(column, justify="right")
    for rank, score in enumerate(scores, start=1):
        name = score.name + (" (task default)" if score.name == default_layer else "")
        table.add_row(
            str(rank),
            name,
            score.kind,
            _shape(score.shape),
            _num(score.entropy),
            f"{score.loss_mean:.4g}",
            f"{score.loss_std:.3g}",
            style="bold green" if rank == 1 else None,
        )
    return table


def ranking_json(
    scores: list[LayerScore], cfg: LayerSelectionConfig, default_layer: str | None = None
) -> dict[str, Any]:
    """The ranking for ``--json``: layers (with rank), the chosen one and the config.

    An entropy of ``-inf`` (perturbations never changed the loss) is written as null.
    """
    report: dict[str, Any] = {
        "layers": [
            {
                "name": s.name,
                "kind": s.kind,
                "shape": list(s.shape),
                "entropy": _finite(s.entropy),
                "loss_mean": s.loss_mean,
                "loss_std": s.loss_std,
                "rank": rank,
            }
            for rank, s in enumerate(scores, start=1)
        ],
        "chosen": scores[0].name if scores else None,
        "config": dataclasses.asdict(cfg),
    }
    if default_layer is not None:
        report["default"] = default_layer
    return report
