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


def evaluate_key(train_key: str, cfg: EvaluateConfig, alternative_key: str | None = None) -> str:
    return cache_key(STAGE, train=train_key, config=key_fields(cfg), alternative=alternative_key)


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
    alternative: tuple[StageResult, StageResult] | None = None,
) -> StageResult:
    """Evaluate every method on the test split (or fetch the cached report).

    `alternative` (the store and trained model of another layer) adds the paper's
    "alternative layer" ablation: OCD applied to that layer instead.
    """
    key = evaluate_key(train.key, cfg, alternative[1].key if alternative else None)
    entry = None if force else ctx.cache.lookup(STAGE, key)
    if entry is not None:
        return _result(entry.path, key, True)
    with ctx.cache.lock(STAGE, key):
        partial = ctx.cache.begin(STAGE, key, fresh=True)
        start = time.perf_counter()
        report, arrays = _evaluate(ctx, base, overfit, train, cfg, alternative)
        report["seconds"] = round(time.perf_counter() - start, 1)
        write_json_atomic(partial / REPORT, report)
        np.savez(partial / PER_SAMPLE, **arrays)
        _plots(ctx, report, arrays, partial)
        ctx.cache.publish(STAGE, key, {"task": ctx.task.name, "train_key": train.key, "config": key_fields(cfg)})
    return _result(ctx.cache.path(STAGE, key), key, False)


class DeltaSampler:
    """Label-free weight changes for one (store, trained diffusion model) pair: DDIM + predicted scale."""

    def __init__(self, ctx: Context, overfit: StageResult, train: StageResult):
        self.store = RecordStore.open(str(overfit.path / STORE_NAME))
        self.layer = self.store.attrs["layer"]
        self.weight_shape = tuple(self.store.attrs["weight_shape"])
        spec, self.unet, self.scale = load_trained(train, ctx.device)
        self.image_shape, self.matrix_shape = tuple(spec["image_shape"]), tuple(spec["matrix_shape"])
        self.sampler = create_diffusion().sampler
        self.task, self.device = ctx.task, ctx.device

    def test_conditioning(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        group = self.store.split("test")
        records = {k: torch.from_numpy(group[k][start:stop]) for k in ("act_in", "act_out", "output")}
        return {k: v.to(self.device) for k, v in conditioning(self.task, records).items()}

    @torch.no_grad()
    def omega(self, cond: dict[str, torch.Tensor], generator: torch.Generator, cfg: EvaluateConfig) -> torch.Tensor:
        """One normalised sample (n, out, K) from fresh starting noise."""
        n = next(iter(cond.values())).shape[0]
        noise = torch.randn((n, 1, *self.image_shape), generator=generator).to(self.device)
        sample = self.sampler.sample(lambda x, t: self.unet(x, t, cond), noise, cfg.steps, eta=cfg.eta,
                                     generator=generator)
        return from_image(sample, self.matrix_shape)

    def deltas(self, omega: torch.Tensor, rho: torch.Tensor | float) -> torch.Tensor:
        rho = rho[:, None, None] if isinstance(rho, torch.Tensor) else rho
        return (rho * omega).reshape(len(omega), *self.weight_shape)


def _evaluate(ctx, base, overfit, train, cfg: EvaluateConfig, alternative=None):
    task, device = ctx.task, ctx.device
    main = DeltaSampler(ctx, overfit, train)
    alt = DeltaSampler(ctx, *alternative) if alternative else None
    store = main.store
    model = load_base_model(ctx, base)
    train_rhos = [
        delta_scale(delta_matrix(torch.from_numpy(r["delta"]))) for r in store.iter_blocks("train", ("delta",))
    ]
    mean_rho = float(torch.cat(train_rhos).mean())
    nearest = NearestNeighbour(ctx, store, main.unet.normalizer)
    generator = torch.Generator().manual_seed(cfg.seed)
    methods = METHODS + (("alternative_layer",) if alt else ())
    outputs: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
    members: list[list[torch.Tensor]] = [[] for _ in range(cfg.ensemble)]
    labels, rho_true, rho_pred, nn_index = [], [], [], []
    with ctx.progress() as progress:
        bar = progress.add_task("evaluate", total=store.size("test"), info="")
        for block, (start, stop) in enumerate(store.blocks("test")):
            rec = {k: torch.from_numpy(v) for k, v in store.read_block("test", block, TEST_FIELDS).items()}
            inputs = rec["input"].to(device)
            cond = {k: v.to(device) for k, v in conditioning(task, rec).items()}
            labels.append(rec["label"])
            with torch.no_grad():
                rho_hat = main.scale(cond)

            def run(deltas, layer=main.layer, inputs=inputs):
                return outputs_with_deltas(model, layer, inputs, None if deltas is None else deltas.to(device)).cpu()

            omegas = [main.omega(cond, generator, cfg) for _ in range(cfg.ensemble)]
            for k, omega in enumerate(omegas):
                members[k].append(run(main.deltas(omega, rho_hat)))
            outputs["base"].append(run(None))
            outputs["ocd"].append(members[0][-1])
            outputs["oracle"].append(run(rec["delta"]))
            nn_delta, index = nearest.deltas({k: v.cpu() for k, v in cond.items()})
            nn_index.append(index)
            outputs["nearest_neighbour"].append(run(nn_delta))
            outputs["no_scale"].append(run(main.deltas(omegas[0], mean_rho)))
            if alt is not None:
                alt_cond = alt.test_conditioning(start, stop)
                with torch.no_grad():
                    alt_rho = alt.scale(alt_cond)
                alt_delta = alt.deltas(alt.omega(alt_cond, generator, cfg), alt_rho)
                outputs["alternative_layer"].append(run(alt_delta, layer=alt.layer))
            rho_true.append(delta_scale(delta_matrix(rec["delta"])))
            rho_pred.append(rho_hat.cpu())
            progress.update(bar, advance=stop - start)
    label = torch.cat(labels)
    member_outputs = torch.stack([torch.cat(m) for m in members])  # (K, N, ...)
    final = {m: torch.cat(v) for m, v in outputs.items() if v}
    final["ocd_ensemble"] = task.combine_outputs(member_outputs)
    report, arrays = _report(ctx, cfg, final, member_outputs, label, torch.cat(rho_true), torch.cat(rho_pred),
                             np.concatenate(nn_index), mean_rho)
    report["layer"] = main.layer
    if alt is not None:
        report["alternative_layer"] = alt.layer
    return report, arrays


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
    changes = {k[5:]: v - arrays["loss_base"] for k, v in arrays.items() if k.startswith("loss_") and k != "loss_base"}
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
