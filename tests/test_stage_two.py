"""Stage two: the streaming reader, eval mode during sampling, and the full report on a small task."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ocd.pipeline.reader import StoreStream, stream_loader

TINY_CONFIG = """
[train]
profile = "tiny"
epochs = 1
batch_size = 64
[evaluate]
ensemble = 3
bootstrap = 100
"""
METHODS = ("base", "ocd", "ocd_ensemble", "oracle", "nearest_neighbour", "no_scale")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One small `ocd run` on digits, shared by the tests below."""
    import subprocess

    from tests_support import ocd_command

    root = tmp_path_factory.mktemp("stage2")
    config = root / "tiny.toml"
    config.write_text(TINY_CONFIG)
    proc = subprocess.run(
        ocd_command("run", "--task", "digits", "--cache-dir", root / "cache", "--config", config, "--workers", "0",
                    "--json", "--no-progress"),
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return root, config, json.loads(proc.stdout)


def test_report_holds_every_method_with_intervals_and_plots(digits_run):
    _, _, report = digits_run
    for method in METHODS:
        for metric in ("loss", "accuracy", "nll", "ece"):
            assert np.isfinite(report["metrics"][method][metric]), (method, metric)
    assert report["metrics"]["oracle"]["loss"] < report["metrics"]["base"]["loss"]
    full = json.loads(Path(report["report"]).read_text())
    for method in METHODS:
        interval = full["intervals"][method]["loss"]
        assert interval["ci_low"] <= interval["mean"] <= interval["ci_high"]
    for method in METHODS[1:]:
        paired = full["paired_vs_base"][method]["loss"]
        assert paired["ci_low"] <= paired["mean"] <= paired["ci_high"]
    assert full["ensemble_curve"]["sizes"] == [1, 2, 3]
    for plot in report["plots"]:
        assert Path(plot).stat().st_size > 1000
    with np.load(Path(report["path"]) / "per_sample.npz", allow_pickle=False) as arrays:
        assert arrays["loss_base"].shape == (300,)


def test_second_run_is_all_cache_hits(digits_run, run_cli):
    root, config, report = digits_run
    again = run_cli("run", "--task", "digits", "--cache-dir", root / "cache", "--config", config, "--workers", "0",
                    "--json", "--no-progress")
    assert again.code == 0, again.err
    assert again.json()["cached"] is True and again.json()["key"] == report["key"]
    assert again.err.count("cache hit") >= 4


def test_models_are_in_eval_mode_during_evaluation(digits_run, monkeypatch, run_cli):
    from ocd.diffusion.unet import UNet
    from ocd.tasks.digits import digits_model

    root, config, _ = digits_run
    modes: list[bool] = []
    original = UNet.forward

    def recording_forward(self, x, t, cond=None):
        modes.append(self.training)
        return original(self, x, t, cond)

    monkeypatch.setattr(UNet, "forward", recording_forward)
    base_modes: list[bool] = []
    model_class = type(digits_model())
    original_base = model_class.forward

    def recording_base(self, x):
        base_modes.append(self.training)
        return original_base(self, x)

    monkeypatch.setattr(model_class, "forward", recording_base)
    result = run_cli("evaluate", "--task", "digits", "--cache-dir", root / "cache", "--config", config,
                     "--workers", "0", "--seed", "7", "--json", "--no-progress")
    assert result.code == 0, result.err
    assert modes and not any(modes), "the denoiser ran in training mode"
    assert base_modes and not any(base_modes), "the base model ran in training mode"


def test_stream_yields_every_record_once_per_epoch(digits_run):
    root, _, _ = digits_run
    store = next((root / "cache" / "overfit").glob("*/store.zarr"))
    n = 1497
    orders = []
    for epoch in (0, 1):
        stream = StoreStream(str(store), "train", ("loss_before", "label"), shuffle=True, buffer_size=200, seed=3)
        stream.set_epoch(epoch)
        values = torch.cat([b["loss_before"] for b in stream_loader(stream, batch_size=100)])
        assert len(values) == n
        orders.append(values)
    reference = torch.from_numpy(np.asarray(__import__("zarr").open_array(str(store / "train" / "loss_before"))[:]))
    for values in orders:
        assert torch.equal(torch.sort(values).values, torch.sort(reference).values)
        assert not torch.equal(values, reference), "records must be shuffled"
    assert not torch.equal(orders[0], orders[1]), "each epoch has its own order"


def test_stream_with_worker_processes_is_exactly_once(digits_run):
    root, _, _ = digits_run
    store = next((root / "cache" / "overfit").glob("*/store.zarr"))
    stream = StoreStream(str(store), "test", ("loss_before",), shuffle=True, buffer_size=50, seed=0)
    values = torch.cat([b["loss_before"] for b in stream_loader(stream, batch_size=32, num_workers=2)])
    reference = np.asarray(__import__("zarr").open_array(str(store / "test" / "loss_before"))[:])
    np.testing.assert_array_equal(np.sort(values.numpy()), np.sort(reference))


def test_alternative_layer_ablation(digits_run, run_cli):
    root, config, report = digits_run
    result = run_cli("evaluate", "--task", "digits", "--cache-dir", root / "cache", "--config", config,
                     "--workers", "0", "--alternative-layer", "--json", "--no-progress")
    assert result.code == 0, result.err
    alt = result.json()
    assert alt["key"] != report["key"]
    assert np.isfinite(alt["metrics"]["alternative_layer"]["loss"])
    full = json.loads(Path(alt["report"]).read_text())
    assert full["layer"] == "2" and full["alternative_layer"] not in ("2", None)
    assert "alternative_layer" in full["paired_vs_base"]
