"""Evaluation on the test split: base model, OCD, OCD ensemble, oracle and the paper's ablations.

No method sees a test label except the oracle, which is the sample's own stage-one delta (it was
finetuned with its label): an upper bound, not a legal method. Every model runs in eval mode.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..diffusion import create_diffusion, from_image
from ..pipeline.apply_delta import outputs_with_deltas
from ..pipeline.cache import write_json_atomic
from ..pipeline.config import EvaluateConfig, key_fields
from ..pipeline.context import Context, StageResult
from ..pipeline.fingerprint import cache_key
from ..pipeline.signals import conditioning, delta_matrix, delta_scale
from ..pipeline.stats import bootstrap_indices, metric_intervals, paired_difference
from ..pipeline.store import RecordStore
from .base import load_base_model
from .overfit import STORE_NAME
from .train import load_trained

STAGE = "evaluate"
REPORT = "report.json"
PER_SAMPLE = "per_sample.npz"
METHODS = ("base", "ocd", "ocd_ensemble", "oracle", "nearest_neighbour", "no_scale")
TEST_FIELDS = ("input", "label", "act_in", "act_out", "output", "delta")


def evaluate_key(train_key: str, cfg: EvaluateConfig) -> str:
    return cache_key(STAGE, train=train_key, config=key_fields(cfg))


class NearestNeighbour:
    """The training delta whose (normalised) conditioning is nearest to a test sample's."""

    def __init__(self, ctx: Context, store: RecordStore, normalize):
        feats = []
        for records in store.iter_blocks("train", ("act_in", "act_out", "output")):
            cond = conditioning(ctx.task, {k: torch.from_numpy(v) for k, v in records.items()})
            feats.append(self._features(normalize(cond)))
        self.train_features = torch.cat(feats)
        self.normalize, self.task, self.store = normalize, ctx.task, store

    @staticmethod
    def _features(cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([cond[name] for name in sorted(cond)], dim=1)

    def deltas(self, cond: dict[str, torch.Tensor]) -> tuple[torch.Tensor, np.ndarray]:
        query = self._features(self.normalize(cond))
        index = torch.cdist(query, self.train_features).argmin(dim=1).numpy()
        unique, inverse = np.unique(index, return_inverse=True)
        rows = self.store.split("train")["delta"].oindex[unique]
        return torch.from_numpy(np.asarray(rows))[torch.from_numpy(inverse)], index


def run_evaluate(
    ctx: Context,
    base: StageResult,
    overfit: StageResult,
    train: StageResult,
    cfg: EvaluateConfig,
    force: bool = False,
) -> StageResult:
    """Evaluate every method on the test split (or fetch the cached report)."""
    key = evaluate_key(train.key, cfg)
    entry = None if force else ctx.cache.lookup(STAGE, key)
    if entry is not None:
        return _result(entry.path, key, True)
    with ctx.cache.lock(STAGE, key):
        partial = ctx.cache.begin(STAGE, key, fresh=True)
        start = time.perf_counter()
        report, arrays = _evaluate(ctx, base, overfit, train, cfg)
        report["seconds"] = round(time.perf_counter() - start, 1)
        write_json_atomic(partial / REPORT, report)
        np.savez(partial / PER_SAMPLE, **arrays)
        _plots(ctx, report, arrays, partial)
        ctx.cache.publish(STAGE, key, {"task": ctx.task.name, "train_key": train.key, "config": key_fields(cfg)})
    return _result(ctx.cache.path(STAGE, key), key, False)


def _evaluate(ctx, base, overfit, train, cfg: EvaluateConfig) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    task, device = ctx.task, ctx.device
    store = RecordStore.open(str(overfit.path / STORE_NAME))
    layer = store.attrs["layer"]
    weight_shape = tuple(store.attrs["weight_shape"])
    model = load_base_model(ctx, base)
    spec, unet, scale = load_trained(train, device)
    image_shape = tuple(spec["image_shape"])
    matrix_shape = tuple(spec["matrix_shape"])
    _, sampler = create_diffusion()
    train_rhos = [
        delta_scale(delta_matrix(torch.from_numpy(r["delta"]))) for r in store.iter_blocks("train", ("delta",))
    ]
    mean_rho = float(torch.cat(train_rhos).mean())
    nearest = NearestNeighbour(ctx, store, unet.normalizer)
    generator = torch.Generator().manual_seed(cfg.seed)
    outputs: dict[str, list[torch.Tensor]] = {m: [] for m in METHODS}
    members: list[list[torch.Tensor]] = [[] for _ in range(cfg.ensemble)]
    labels, rho_true, rho_pred, nn_index = [], [], [], []
    blocks = store.blocks("test")
    with ctx.progress() as progress:
        bar = progress.add_task("evaluate", total=store.size("test"), info="")
        for block in range(len(blocks)):
            rec = {k: torch.from_numpy(v) for k, v in store.read_block("test", block, TEST_FIELDS).items()}
            inputs, n = rec["input"].to(device), len(rec["input"])
            cond = {k: v.to(device) for k, v in conditioning(task, rec).items()}
            labels.append(rec["label"])
            with torch.no_grad():
                rho_hat = scale(cond)

            def run(deltas, inputs=inputs, n=n):
                d = None if deltas is None else deltas.reshape(n, *weight_shape).to(device)
                return outputs_with_deltas(model, layer, inputs, d).cpu()

            omegas = []
            for k in range(cfg.ensemble):
                noise = torch.randn((n, 1, *image_shape), generator=generator).to(device)
                sample = sampler.sample(
                    lambda x, t, c=cond: unet(x, t, c), noise, cfg.steps, eta=cfg.eta, generator=generator
                )
                omega = from_image(sample, matrix_shape)
                omegas.append(omega)
                members[k].append(run(rho_hat[:, None, None] * omega))
            outputs["base"].append(run(None))
            outputs["ocd"].append(members[0][-1])
            outputs["oracle"].append(run(rec["delta"]))
            nn_delta, index = nearest.deltas({k: v.cpu() for k, v in cond.items()})
            nn_index.append(index)
            outputs["nearest_neighbour"].append(run(nn_delta))
            outputs["no_scale"].append(run(mean_rho * omegas[0]))
            rho_true.append(delta_scale(delta_matrix(rec["delta"])))
            rho_pred.append(rho_hat.cpu())
            progress.update(bar, advance=n)
    label = torch.cat(labels)
    member_outputs = torch.stack([torch.cat(m) for m in members])  # (K, N, ...)
    final = {m: torch.cat(v) for m, v in outputs.items() if v}
    final["ocd_ensemble"] = task.combine_outputs(member_outputs)
    return _report(ctx, cfg, final, member_outputs, label, torch.cat(rho_true), torch.cat(rho_pred),
                   np.concatenate(nn_index), mean_rho)


def _report(ctx, cfg, final, member_outputs, label, rho_true, rho_pred, nn_index, mean_rho):
    task = ctx.task
    indices = bootstrap_indices(len(label), cfg.bootstrap, cfg.seed)
    losses = {m: task.loss(out.double(), label).numpy() for m, out in final.items()}
    report: dict[str, Any] = {"task": task.name, "samples": len(label), "config": key_fields(cfg), "metrics": {},
                              "intervals": {}, "paired_vs_base": {}}
    for method, out in final.items():
        intervals = metric_intervals(task.metrics, out.double(), label, indices)
        report["metrics"][method] = {name: v["mean"] for name, v in intervals.items()}
        report["intervals"][method] = intervals
        if method != "base":
            report["paired_vs_base"][method] = {"loss": paired_difference(losses[method], losses["base"], indices)}
    sizes = list(range(1, cfg.ensemble + 1))
    curve = [task.metrics(task.combine_outputs(member_outputs[:k]).double(), label) for k in sizes]
    report["ensemble_curve"] = {"sizes": sizes, "metrics": {name: [c[name] for c in curve] for name in curve[0]}}
    rel = (rho_pred.double() - rho_true.double()).abs() / rho_true.double()
    report["scale"] = {"train_mean_rho": mean_rho, "median_relative_error": float(rel.median()),
                       "mean_rho_test": float(rho_true.mean()), "mean_rho_pred": float(rho_pred.mean())}
    arrays = {f"loss_{m}": v for m, v in losses.items()}
    arrays.update(label=label.numpy(), rho_true=rho_true.numpy(), rho_pred=rho_pred.numpy(), nn_index=nn_index)
    return report, arrays


def _plots(ctx: Context, report: dict[str, Any], arrays: dict[str, np.ndarray], out: Path) -> None:
    from ..pipeline.plots import plot_ensemble_curve, plot_loss_change

    curve = report["ensemble_curve"]
    plot_ensemble_curve(curve["sizes"], curve["metrics"], report["metrics"]["base"], out / "ensemble.png")
    changes = {m: arrays[f"loss_{m}"] - arrays["loss_base"] for m in METHODS if m != "base" and f"loss_{m}" in arrays}
    plot_loss_change(changes, out / "loss_change.png")


def _result(path: Path, key: str, cached: bool) -> StageResult:
    report = json.loads((path / REPORT).read_text())
    summary = {
        "report": str(path / REPORT),
        "plots": [str(path / "ensemble.png"), str(path / "loss_change.png")],
        "paired_vs_base": report["paired_vs_base"],
        "seconds": report.get("seconds"),
    }
    return StageResult(STAGE, key, path, cached, report["metrics"], summary)
