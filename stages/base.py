"""Stage zero: train the task's base model and cache its weights and metrics."""
from __future__ import annotations

import json
import time

import torch
from torch import nn

from ..pipeline.cache import Entry, write_json_atomic
from ..pipeline.config import BaseConfig, key_fields
from ..pipeline.context import Context, StageResult
from ..pipeline.data import split_arrays
from ..pipeline.errors import OcdError
from ..pipeline.fingerprint import cache_key
from ..pipeline.weights import load_weights, save_weights

STAGE = "base"
WEIGHTS = "model.safetensors"
METRICS = "metrics.json"


def base_key(ctx: Context, cfg: BaseConfig) -> str:
    """Key of the base model: task, its data, its architecture and the training config."""
    return cache_key(
        STAGE,
        task=ctx.task.name,
        task_version=ctx.task.version,
        data=ctx.data_fingerprint,
        model=repr(ctx.task.build_model()),
        config=key_fields(cfg),
    )


@torch.no_grad()
def predict(model: nn.Module, inputs: torch.Tensor, device: torch.device, batch_size: int = 512) -> torch.Tensor:
    """Outputs of `model` (in eval mode) for all inputs, on the CPU."""
    model.eval()
    outs = [model(inputs[i : i + batch_size].to(device)).cpu() for i in range(0, len(inputs), batch_size)]
    return torch.cat(outs)


def evaluate_split(ctx: Context, model: nn.Module, split: str) -> dict[str, float]:
    inputs, labels = split_arrays(ctx.splits[split])
    outputs = predict(model, inputs, ctx.device)
    return ctx.task.metrics(outputs, labels)


def train_base_model(ctx: Context, cfg: BaseConfig) -> nn.Module:
    """Minibatch Adam on the train split; returns the model in eval mode."""
    torch.manual_seed(cfg.seed)
    model = ctx.task.build_model().to(ctx.device)
    inputs, labels = split_arrays(ctx.splits["train"])
    try:
        with torch.no_grad():
            model.eval()
            ctx.task.loss(model(inputs[:2].to(ctx.device)), labels[:2].to(ctx.device))
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise OcdError(f"task {ctx.task.name}: the model cannot take the data's inputs: {first}") from None
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = -(-len(inputs) // cfg.batch_size)
    with ctx.progress() as progress:
        bar = progress.add_task("base model", total=cfg.epochs * steps_per_epoch, info="")
        for epoch in range(cfg.epochs):
            model.train()
            order = torch.randperm(len(inputs), generator=generator)
            total = 0.0
            for i in range(0, len(inputs), cfg.batch_size):
                idx = order[i : i + cfg.batch_size]
                loss = ctx.task.loss(model(inputs[idx].to(ctx.device)), labels[idx].to(ctx.device)).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(idx)
                progress.advance(bar)
            progress.update(bar, info=f"epoch {epoch + 1}/{cfg.epochs} loss {total / len(inputs):.4f}")
    return model.eval()


def run_base(ctx: Context, cfg: BaseConfig, force: bool = False) -> StageResult:
    """Train (or fetch from the cache) the base model."""
    key = base_key(ctx, cfg)
    entry = None if force else ctx.cache.lookup(STAGE, key)
    if entry is not None:
        return _result(entry, cached=True)
    with ctx.cache.lock(STAGE, key):
        partial = ctx.cache.begin(STAGE, key, fresh=True)
        start = time.perf_counter()
        model = train_base_model(ctx, cfg)
        seconds = time.perf_counter() - start
        metrics = {split: evaluate_split(ctx, model, split) for split in ("train", "test")}
        save_weights(model, partial / WEIGHTS, metadata={"task": ctx.task.name, "key": key})
        write_json_atomic(partial / METRICS, metrics)
        entry = ctx.cache.publish(
            STAGE,
            key,
            {
                "task": ctx.task.name,
                "task_version": ctx.task.version,
                "data_fingerprint": ctx.data_fingerprint,
                "config": key_fields(cfg),
                "train_seconds": round(seconds, 2),
                "metrics": metrics,
            },
        )
    return _result(entry, cached=False)


def _result(entry: Entry, cached: bool) -> StageResult:
    metrics = json.loads((entry.path / METRICS).read_text())
    return StageResult(
        STAGE, entry.key, entry.path, cached, metrics, {"train_seconds": entry.meta.get("train_seconds")}
    )


def load_base_model(ctx: Context, result: StageResult) -> nn.Module:
    """The cached base model, in eval mode, every parameter frozen."""
    model = load_weights(ctx.task.build_model(), result.path / WEIGHTS, ctx.device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
