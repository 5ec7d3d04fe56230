"""Stage one: per-sample overfitting of one layer, vectorized per block, distributed on Dask.

Every sample of both splits is finetuned alone (Adam on the layer's weight, bias untouched,
the base model frozen in eval mode); its conditioning signals and weight change go to the Zarr
record store (pipeline/store.py). Blocks of samples are the unit of work, of Dask scheduling and
of storage (one chunk each), so a killed run resumes at the first unfinished block.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..pipeline.cache import dir_size
from ..pipeline.cluster import ClusterConfig, Executor, open_executor
from ..pipeline.config import OverfitConfig, key_fields
from ..pipeline.context import Context, StageResult
from ..pipeline.data import split_arrays
from ..pipeline.errors import OcdError
from ..pipeline.finetune import AdamSettings, PerSampleFinetuner, describe_layer
from ..pipeline.fingerprint import SCHEMA_VERSION, cache_key
from ..pipeline.store import RECORD_FIELDS, SPLITS, FieldSpec, RecordStore
from ..tasks import Task, get_task
from .base import WEIGHTS, load_base_model

STAGE = "overfit"
STORE_NAME = "store.zarr"
STAT_FIELDS = ("delta", "act_in", "act_out", "output")
MICRO_BATCH = 64
"""Samples finetuned per kernel call. Every call sees exactly this many samples (the last one of a
block is padded), so a sample's floating-point result does not depend on the block it falls in."""


def adam_settings(cfg: OverfitConfig) -> AdamSettings:
    return AdamSettings(steps=cfg.steps, lr=cfg.lr)


def overfit_key(ctx: Context, base: StageResult, cfg: OverfitConfig, layer: str) -> str:
    """Key of a store: the base model's key, the layer and the finetuning config."""
    return cache_key(
        STAGE, task=ctx.task.name, task_version=ctx.task.version, base=base.key, layer=layer, config=key_fields(cfg)
    )


@dataclass(frozen=True)
class BlockJob:
    """One unit of work, sent to a Dask worker: everything it needs to rebuild its state."""

    task_spec: str
    cache_root: str
    weights: str
    layer: str
    settings: AdamSettings
    store_url: str
    split: str
    block: int
    threads: int
    device: str = "cpu"


@dataclass(frozen=True)
class BlockReport:
    split: str
    block: int
    samples: int
    seconds: float
    checksum: int


@functools.lru_cache(maxsize=2)
def _worker_state(task_spec: str, cache_root: str, weights: str, layer: str, device: str):
    """Per-process state, built once per worker: task, data, base model and finetuner."""
    from ..pipeline.cache import Cache

    ctx = Context(task_spec, Cache(cache_root))
    task = ctx.task
    arrays = {split: split_arrays(ctx.splits[split]) for split in SPLITS}
    from ..pipeline.weights import load_weights

    model = load_weights(task.build_model(), Path(weights), device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return task, arrays, PerSampleFinetuner(model, layer)


def loss_in_float64(loss: Any, output: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """`loss` on float64 copies of the output (and of floating-point labels)."""
    return loss(output.double(), label.double() if label.is_floating_point() else label)


def compute_records(
    task: Task, finetuner: PerSampleFinetuner, inputs: torch.Tensor, labels: torch.Tensor, settings: AdamSettings
) -> dict[str, np.ndarray]:
    """The store's records for a batch of samples, computed in fixed-size micro-batches.

    The loss is evaluated in float64 so that the recorded before/after losses of samples the base
    model already fits (cross-entropy below float32's resolution) still tell which is smaller.
    """
    loss = functools.partial(loss_in_float64, task.loss)
    parts = []
    for start in range(0, len(inputs), MICRO_BATCH):
        x, y = inputs[start : start + MICRO_BATCH], labels[start : start + MICRO_BATCH]
        n = len(x)
        if n < MICRO_BATCH:  # pad with copies of the last sample; they are dropped below
            x = torch.cat([x, x[-1:].expand(MICRO_BATCH - n, *x.shape[1:])])
            y = torch.cat([y, y[-1:].expand(MICRO_BATCH - n, *y.shape[1:])])
        result = finetuner(x, y, loss, settings)
        with torch.no_grad():
            values = {
                "input": x,
                "label": y,
                "act_in": task.summarize_activation(result.act_in),
                "act_out": task.summarize_activation(result.act_out),
                "output": result.output,
                "delta": result.delta,
                "loss_before": result.loss_before,
                "loss_after": result.loss_after,
            }
        parts.append({name: values[name][:n].detach().cpu().numpy() for name in RECORD_FIELDS})
    return {name: np.concatenate([p[name] for p in parts]) for name in RECORD_FIELDS}


def run_block(job: BlockJob) -> BlockReport:
    """Finetune one block of samples and write it to the store (runs on a worker)."""
    start_time = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(job.threads)
    try:
        task, arrays, finetuner = _worker_state(job.task_spec, job.cache_root, job.weights, job.layer, job.device)
        store = RecordStore.open(job.store_url, mode="r+")
        start, stop = store.blocks(job.split)[job.block]
        inputs, labels = (a[start:stop].to(job.device) for a in arrays[job.split])
        records = compute_records(task, finetuner, inputs, labels, job.settings)
        checksum = store.write_block(job.split, job.block, records)
    finally:
        torch.set_num_threads(threads)
    return BlockReport(job.split, job.block, stop - start, time.perf_counter() - start_time, checksum)


def _field_specs(records: dict[str, np.ndarray]) -> dict[str, FieldSpec]:
    specs = {}
    for name, values in records.items():
        if np.issubdtype(values.dtype, np.integer):
            dtype = "int64"
        else:  # losses are computed in float64 (see compute_records) and kept so; the rest in float32
            dtype = "float64" if values.dtype == np.float64 and values.ndim == 1 else "float32"
        specs[name] = FieldSpec(tuple(values.shape[1:]), dtype)
    return specs


def _provenance(ctx: Context, base: StageResult, cfg: OverfitConfig, layer: str, key: str, sizes) -> dict[str, Any]:
    from .. import __version__

    model = ctx.task.build_model()
    info = describe_layer(model, layer)
    return {
        "schema_version": SCHEMA_VERSION,
        "key": key,
        "task": ctx.task.name,
        "task_version": ctx.task.version,
        "base_key": base.key,
        "layer": layer,
        "layer_kind": info.kind,
        "weight_shape": list(info.weight_shape),
        "matrix_shape": list(info.matrix_shape),
        "optimizer": {"name": "adam", **vars(adam_settings(cfg))},
        "config": key_fields(cfg),
        "data_fingerprint": ctx.data_fingerprint,
        "sizes": sizes,
        "seed": None,
        "activation_summary": getattr(ctx.task.summarize_activation, "__name__", "custom"),
        "ocd_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def summarize_store(store: RecordStore) -> dict[str, Any]:
    """Per-array mean and std (from the blocks' recorded moments) and the loss summaries."""
    stats: dict[str, Any] = {}
    for split in SPLITS:
        group = store.split(split)
        moments = group["moments"][:].sum(axis=0)
        split_stats: dict[str, Any] = {}
        for name in STAT_FIELDS:
            i = RECORD_FIELDS.index(name)
            count = store.size(split) * math.prod(group[name].shape[1:])
            mean = moments[i, 0] / count
            split_stats[name] = {"mean": mean, "std": math.sqrt(max(moments[i, 1] / count - mean**2, 0.0))}
        loss_before, loss_after = store.read(split, "loss_before"), store.read(split, "loss_after")
        split_stats["loss_before"] = float(loss_before.mean())
        split_stats["loss_after"] = float(loss_after.mean())
        split_stats["improved_fraction"] = float((loss_after < loss_before).mean())
        stats[split] = split_stats
    return stats


def validate_overfit_config(ctx: Context, cfg: OverfitConfig) -> None:
    """Reject a bad layer or block size before any work is done."""
    if cfg.block_size % MICRO_BATCH:
        raise OcdError(f"block size must be a multiple of {MICRO_BATCH}, got {cfg.block_size}")
    if cfg.layer not in ("", "auto"):
        try:
            describe_layer(ctx.task.build_model(), cfg.layer)
        except ValueError as exc:
            raise OcdError(f"task {ctx.task.name}: {exc}") from None


def run_overfit(
    ctx: Context,
    base: StageResult,
    cfg: OverfitConfig,
    cluster: ClusterConfig,
    force: bool = False,
) -> StageResult:
    """Build (or fetch, or finish) the record store for the task's base model."""
    layer = cfg.layer or ctx.task.layer
    validate_overfit_config(ctx, replace(cfg, layer=layer))
    cfg = replace(cfg, layer=layer)
    key = overfit_key(ctx, base, cfg, layer)
    entry = None if force else ctx.cache.lookup(STAGE, key)
    if entry is not None:
        url = str(entry.path / STORE_NAME)
        check_provenance(RecordStore.open(url), url, key=key, task=ctx.task.name, base_key=base.key, layer=layer)
        return _result(entry.path, key, cached=True, meta=entry.meta)
    with ctx.cache.lock(STAGE, key), open_executor(cluster) as executor:
        partial = ctx.cache.begin(STAGE, key, fresh=force)
        url = str((partial / STORE_NAME).resolve())
        store = _open_or_create(ctx, base, cfg, layer, key, url)
        job_template = BlockJob(
            task_spec=_portable_task_spec(ctx.task_spec),
            cache_root=str(ctx.cache.root.resolve()),
            weights=str((base.path / WEIGHTS).resolve()),
            layer=layer,
            settings=adam_settings(cfg),
            store_url=url,
            split="",
            block=-1,
            threads=cluster.threads_per_worker,
            device=str(ctx.device),
        )
        jobs = [replace(job_template, split=s, block=b) for s in SPLITS for b in store.missing_blocks(s)]
        computed, seconds = _execute(ctx, executor, jobs, key)
        stats = summarize_store(store)
        store.finalize({"stats": stats})
        meta = {
            "task": ctx.task.name,
            "base_key": base.key,
            "layer": layer,
            "config": key_fields(cfg),
            "samples": {s: store.size(s) for s in SPLITS},
            "computed_samples": computed,
            "seconds": round(seconds, 3),
            "stats": stats,
        }
        entry = ctx.cache.publish(STAGE, key, meta)
    return _result(entry.path, key, cached=False, meta=entry.meta)


def check_provenance(store: RecordStore, url: str, **expected: str) -> None:
    """Refuse a store whose provenance differs from what was asked for (task, base model, layer, key)."""
    attrs = store.attrs
    for field, value in expected.items():
        if attrs.get(field) != value:
            raise OcdError(
                f"store {url} was made with {field} {attrs.get(field)!r}, not the requested {value!r}; "
                "refusing to reuse it (remove it with `ocd cache rm`)"
            )


def _portable_task_spec(spec: str) -> str:
    """Task files are sent to workers with absolute paths."""
    if ".py:" in spec:
        path, _, func = spec.rpartition(":")
        return f"{Path(path).resolve()}:{func}"
    return spec


def _open_or_create(ctx: Context, base: StageResult, cfg: OverfitConfig, layer: str, key: str, url: str):
    if Path(url).exists():
        store = RecordStore.open(url, mode="r+")
        check_provenance(store, url, key=key, task=ctx.task.name, base_key=base.key, layer=layer)
        done = sum(int(store.done_mask(s).sum()) for s in SPLITS)
        if done:
            ctx.say(f"resuming store {key}: {done} finished blocks kept")
        return store
    model = load_base_model(ctx, base)
    task = ctx.task
    inputs, labels = split_arrays(ctx.splits["train"])
    finetuner = PerSampleFinetuner(model, layer)
    probe = compute_records(task, finetuner, inputs[:2].to(ctx.device), labels[:2].to(ctx.device), adam_settings(cfg))
    sizes = {s: len(ctx.splits[s]) for s in SPLITS}
    provenance = _provenance(ctx, base, cfg, layer, key, sizes)
    return RecordStore.create(url, sizes, _field_specs(probe), cfg.block_size, cfg.codec, provenance)


def _execute(ctx: Context, executor: Executor, jobs: list[BlockJob], key: str) -> tuple[int, float]:
    """Run the jobs with a progress bar; returns (samples computed, seconds)."""
    if not jobs:
        return 0, 0.0
    if executor.dashboard_link:
        ctx.say(f"Dask dashboard: {executor.dashboard_link}")
    computed = 0
    start = time.perf_counter()
    with ctx.progress() as progress:
        bar = progress.add_task("overfit blocks", total=len(jobs), info="")
        names = [f"overfit-{key}-{job.split}-{job.block}" for job in jobs]
        for report in executor.map_unordered(run_block, jobs, names):
            computed += report.samples
            rate = computed / max(time.perf_counter() - start, 1e-9)
            progress.update(bar, advance=1, info=f"{rate:,.0f} samples/s")
    return computed, time.perf_counter() - start


def _result(path: Path, key: str, cached: bool, meta: dict[str, Any]) -> StageResult:
    stats = meta["stats"]
    samples = sum(meta["samples"].values())
    seconds = meta.get("seconds") or 0.0
    summary = {
        "samples": samples,
        "layer": meta["layer"],
        "base_key": meta["base_key"],
        "samples_per_s": round(meta["computed_samples"] / seconds, 1) if seconds else None,
        "store_bytes": dir_size(path / STORE_NAME),
        "store": str(path / STORE_NAME),
    }
    metrics = {
        split: {k: stats[split][k] for k in ("loss_before", "loss_after", "improved_fraction")}
        for split in SPLITS
    }
    return StageResult(STAGE, key, path, cached, metrics, summary)


def open_store(result: StageResult) -> RecordStore:
    return RecordStore.open(str(result.path / STORE_NAME))


__all__ = ["ClusterConfig", "get_task", "open_store", "run_block", "run_overfit"]
