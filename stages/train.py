"""Stage two: train the conditional diffusion model (and the scale model) on the store's train split.

The store is streamed (pipeline/reader.py), never loaded whole. Targets are the deltas divided by
their per-sample scale rho; a separate scale model learns rho. Checkpoints (no pickle) allow a
killed run to resume where its last checkpoint left off, with the same data order and noise.
"""
from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..diffusion import (
    EMA,
    PROFILES,
    ScaleModel,
    create_denoiser,
    create_diffusion,
    denoising_loss,
    log_scale_loss,
    padded_shape,
    scale_loss,
    to_image,
)
from ..pipeline.cache import write_json_atomic
from ..pipeline.checkpoint import load_checkpoint, save_checkpoint
from ..pipeline.config import TrainConfig, key_fields
from ..pipeline.context import Context, StageResult
from ..pipeline.errors import OcdError
from ..pipeline.fingerprint import cache_key
from ..pipeline.reader import StoreStream, stream_loader
from ..pipeline.signals import cond_dims, conditioning, delta_matrix, delta_scale
from ..pipeline.store import RecordStore
from ..pipeline.weights import load_weights, save_weights
from ..tasks import Task
from .overfit import STORE_NAME, check_provenance

STAGE = "train"
DENOISER = "denoiser.safetensors"
SCALE = "scale.safetensors"
MODEL_JSON = "model.json"
LOSS_CSV = "loss.csv"
LOSS_PNG = "loss.png"
CHECKPOINT = "checkpoint"
FIELDS = ("act_in", "act_out", "output", "delta")


def train_key(store_key: str, cfg: TrainConfig) -> str:
    """Key of a trained diffusion model: the store, the training config, and the denoiser
    architecture and noise schedule the profile stands for (so editing a profile invalidates it)."""
    architecture = PROFILES[cfg.profile] if cfg.profile in PROFILES else cfg.profile
    return cache_key(STAGE, store=store_key, config=key_fields(cfg), architecture=architecture,
                     schedule=create_diffusion().schedule.config)


def check_store(store: RecordStore, url: str) -> None:
    """Refuse an incomplete or corrupt store with a clear message."""
    from ..pipeline.verify import verify_store

    problems = verify_store(store, check_values=False)
    if problems:
        raise OcdError(f"store {url} cannot be used for training: {problems[0]}")


def build_models(spec: dict[str, Any]) -> tuple[nn.Module, ScaleModel]:
    """The denoiser and scale model described by a model.json spec (untrained)."""
    profile = PROFILES[spec["profile"]]
    overrides: dict[str, Any] = {}
    if profile.axis_channels:
        canvas = padded_shape(tuple(spec["matrix_shape"]), profile.num_downsamplings, patch=profile.patch)
        overrides["axis_size"] = canvas
    if profile.axis_signals:
        rows, cols = (spec["cond_dims"].get(name, 0) for name in profile.axis_signals)
        if (rows, cols) != tuple(spec["matrix_shape"]):  # signals not aligned with this layer's matrix
            overrides["axis_signals"] = ()
    unet = create_denoiser(spec["profile"], spec["cond_dims"], **overrides)
    return unet, ScaleModel(spec["cond_dims"])


def load_trained(result: StageResult, device: torch.device) -> tuple[dict[str, Any], nn.Module, ScaleModel]:
    """The trained (EMA) denoiser and scale model of a train-stage result, in eval mode."""
    spec = json.loads((result.path / MODEL_JSON).read_text())
    unet, scale = build_models(spec)
    load_weights(unet, result.path / DENOISER, device)
    load_weights(scale, result.path / SCALE, device)
    return spec, unet.eval(), scale.eval()


def _fit_statistics(task: Task, store: RecordStore, unet: nn.Module, scale: ScaleModel) -> None:
    """Conditioning normalisers and the scale model's starting point, from one streaming pass."""

    def batches():
        for records in store.iter_blocks("train", FIELDS):
            yield {k: torch.from_numpy(v) for k, v in records.items()}

    conds = (conditioning(task, b) for b in batches())
    unet.normalizer.fit(conds)
    scale.normalizer.load_state_dict(unet.normalizer.state_dict())
    log_rhos = torch.cat([delta_scale(delta_matrix(b["delta"])).log() for b in batches()])
    scale.init_log_scale(log_rhos.exp())


def run_train(ctx: Context, overfit: StageResult, cfg: TrainConfig, force: bool = False) -> StageResult:
    """Train (or fetch, or resume) the diffusion model for a record store."""
    if cfg.profile not in PROFILES:
        raise OcdError(f"unknown denoiser profile {cfg.profile!r} (known: {', '.join(sorted(PROFILES))})")
    key = train_key(overfit.key, cfg)
    entry = None if force else ctx.cache.lookup(STAGE, key)
    if entry is not None:
        return _result(entry.path, key, True, entry.meta)
    url = str(overfit.path / STORE_NAME)
    store = RecordStore.open(url)
    check_provenance(store, url, key=overfit.key, task=ctx.task.name, base_key=overfit.summary["base_key"])
    check_store(store, url)
    with ctx.cache.lock(STAGE, key):
        partial = ctx.cache.begin(STAGE, key, fresh=force)
        start = time.perf_counter()
        spec, losses, seconds = _train(ctx, store, url, cfg, partial)
        meta = {
            "task": ctx.task.name,
            "store_key": overfit.key,
            "config": key_fields(cfg),
            "steps": len(losses),
            "final_loss": _tail_mean([row[2] for row in losses]),
            "final_scale_loss_db": _tail_mean([row[3] for row in losses]),
            "seconds": round(seconds, 1),
            "wall_seconds": round(time.perf_counter() - start, 1),
            "parameters": spec["parameters"],
        }
        entry = ctx.cache.publish(STAGE, key, meta)
    return _result(entry.path, key, False, entry.meta)


def _tail_mean(values: list[float], n: int = 50) -> float | None:
    tail = values[-n:]
    return sum(tail) / len(tail) if tail else None


def _train(ctx: Context, store: RecordStore, url: str, cfg: TrainConfig, out: Path):
    task, device = ctx.task, ctx.device
    torch.manual_seed(cfg.seed)
    first = {k: torch.from_numpy(v) for k, v in store.read_block("train", 0, FIELDS).items()}
    dims = cond_dims(task, first)
    matrix_shape = tuple(delta_matrix(first["delta"]).shape[1:])
    spec = {"profile": cfg.profile, "cond_dims": dims, "matrix_shape": list(matrix_shape)}
    unet, scale = build_models(spec)
    image_size = unet.image_shape(matrix_shape)
    spec.update(
        image_shape=list(image_size),
        weight_shape=list(first["delta"].shape[1:]),
        parameters={"denoiser": sum(p.numel() for p in unet.parameters()),
                    "scale": sum(p.numel() for p in scale.parameters())},
    )
    _fit_statistics(task, store, unet, scale)
    unet.to(device)
    scale.to(device)
    ema = EMA(unet, cfg.ema_decay)
    opt = torch.optim.Adam(unet.parameters(), lr=cfg.lr)
    scale_opt = torch.optim.Adam(scale.parameters(), lr=cfg.scale_lr)
    schedule, _ = create_diffusion()
    generator = torch.Generator().manual_seed(cfg.seed)
    state: dict[str, Any] = {"epoch": 0, "batch": 0, "step": 0, "losses": [], "seconds": 0.0}
    ckpt = out / CHECKPOINT
    modules = {"unet": unet, "scale": scale, "ema": ema.module}
    optimizers = {"unet": opt, "scale": scale_opt}
    if (ckpt / "state.json").is_file():
        state, extra = load_checkpoint(ckpt, modules, optimizers)
        generator.set_state(extra["generator"])
        torch.set_rng_state(extra["torch_rng"])
        ema.num_updates = state["ema_updates"]
        ctx.say(f"resuming training at step {state['step']} (epoch {state['epoch'] + 1})")

    def checkpoint(epoch: int, batch: int) -> None:
        state.update(epoch=epoch, batch=batch, ema_updates=ema.num_updates)
        extra = {"generator": generator.get_state(), "torch_rng": torch.get_rng_state()}
        save_checkpoint(ckpt, modules, optimizers, state, extra)

    stream = StoreStream(url, "train", FIELDS, shuffle=True, buffer_size=cfg.shuffle_buffer, seed=cfg.seed)
    steps_per_epoch = math.ceil(store.size("train") / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    tick = time.perf_counter()
    with ctx.progress() as progress:
        bar = progress.add_task("diffusion training", total=total, completed=state["step"], info="")
        for epoch in range(state["epoch"], cfg.epochs):
            stream.set_epoch(epoch)
            skip = state["batch"] if epoch == state["epoch"] else 0
            unet.train()
            scale.train()
            for i, batch in enumerate(stream_loader(stream, cfg.batch_size, cfg.num_workers)):
                if i < skip:
                    continue
                cond = {k: v.to(device) for k, v in conditioning(task, batch).items()}
                matrix = delta_matrix(batch["delta"]).to(device)
                rho = delta_scale(matrix)
                x0 = to_image(matrix / rho[:, None, None], image_size)
                loss = denoising_loss(lambda x, t, c=cond: unet(x, t, c), schedule, x0, generator)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
                opt.step()
                ema.update(unet)
                log_rho_hat = scale.log_scale(cond)
                fit_loss = log_scale_loss(log_rho_hat, rho)  # well-conditioned; the paper's dB loss is reported
                scale_opt.zero_grad(set_to_none=True)
                fit_loss.backward()
                nn.utils.clip_grad_norm_(scale.parameters(), cfg.grad_clip)
                scale_opt.step()
                state["step"] += 1
                s_loss = scale_loss(log_rho_hat.detach().exp(), rho)
                state["losses"].append([state["step"], epoch, float(loss.detach()), float(s_loss)])
                progress.update(bar, advance=1, info=f"epoch {epoch + 1} loss {float(loss.detach()):.4f}")
                if state["step"] % cfg.checkpoint_every == 0:
                    now = time.perf_counter()
                    state["seconds"] += now - tick
                    tick = now
                    checkpoint(epoch, i + 1)
            state["batch"] = 0
            state["epoch"] = epoch + 1
    state["seconds"] += time.perf_counter() - tick
    save_weights(ema.module, out / DENOISER)
    save_weights(scale, out / SCALE)
    write_json_atomic(out / MODEL_JSON, spec)
    _write_loss_curve(out, state["losses"])
    checkpoint(cfg.epochs, 0)
    return spec, state["losses"], state["seconds"]


def _write_loss_curve(out: Path, losses: list[list[float]]) -> None:
    with open(out / LOSS_CSV, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "epoch", "diffusion_loss", "scale_loss_db"])
        writer.writerows(losses)
    from ..pipeline.plots import plot_loss_curve

    plot_loss_curve(losses, out / LOSS_PNG)


def _result(path: Path, key: str, cached: bool, meta: dict[str, Any]) -> StageResult:
    metrics = {"final_loss": meta["final_loss"], "final_scale_loss_db": meta["final_scale_loss_db"]}
    summary = {
        "steps": meta["steps"],
        "seconds": meta["seconds"],
        "denoiser_parameters": meta["parameters"]["denoiser"],
        "loss_curve": str(path / LOSS_PNG),
    }
    return StageResult(STAGE, key, path, cached, metrics, summary)
