"""Layer selection by the entropy of the training loss under random weight perturbations."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ocd.pipeline.cache import Cache
from ocd.pipeline.config import BaseConfig, build_config
from ocd.pipeline.context import Context
from ocd.pipeline.errors import OcdError
from ocd.pipeline.layer_selection import (
    LayerScore,
    LayerSelectionConfig,
    candidate_layers,
    gaussian_kde_entropy,
    rank_layers,
)
from ocd.pipeline.metrics import squared_error
from ocd.stages.select_layer import ranking_json, ranking_table, resolve_layer, select_layer


def normal_entropy(sigma: float) -> float:
    return 0.5 * math.log(2 * math.pi * math.e * sigma**2)


def test_kde_entropy_matches_normal_closed_form():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2000, generator=gen, dtype=torch.float64)
    small, large = gaussian_kde_entropy(0.5 * z + 3.0), gaussian_kde_entropy(2.0 * z - 1.0)
    # Resubstitution with Scott's bandwidth: within a few hundredths of a nat at n = 2000.
    assert small == pytest.approx(normal_entropy(0.5), abs=0.05)
    assert large == pytest.approx(normal_entropy(2.0), abs=0.05)
    assert large > small
    assert large - small == pytest.approx(math.log(4.0), abs=1e-9)  # entropy shifts by log(scale)


def test_kde_entropy_equals_scipy_default_kde():
    stats = pytest.importorskip("scipy.stats")
    x = torch.randn(1500, generator=torch.Generator().manual_seed(3), dtype=torch.float64) ** 2
    kde = stats.gaussian_kde(x.numpy())
    assert gaussian_kde_entropy(x, block=256) == pytest.approx(-kde.logpdf(x.numpy()).mean(), rel=1e-9)


def test_kde_entropy_edge_cases():
    assert gaussian_kde_entropy(torch.full((10,), 2.5)) == -math.inf
    with pytest.raises(ValueError):
        gaussian_kde_entropy(torch.tensor([1.0]))
    with pytest.raises(ValueError):
        gaussian_kde_entropy(torch.tensor([1.0, float("nan"), 2.0]))


class ThreePaths(nn.Module):
    """`big`'s output is multiplied by 10; the conv path and `small` pass through a gain of 0.01.

    Perturbing `big` changes the output about a thousand times more than perturbing anything else.
    """

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.grouped = nn.Conv2d(4, 4, 1, groups=2)  # not a candidate
        self.act = nn.Tanh()
        self.small = nn.Linear(64, 3)
        self.big = nn.Linear(36, 3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.grouped(self.conv(x))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.01 * self.small(self.features(x)) + 10.0 * self.big(x.flatten(1))


class VmapHostile(ThreePaths):
    """The same function, with data-dependent control flow that torch.vmap cannot run."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = super().features(x)
        if not torch.isfinite(h).all():
            raise RuntimeError("non-finite features")
        return h


def make_problem(model_cls=ThreePaths):
    torch.manual_seed(0)
    model = model_cls().eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(48, 1, 6, 6, generator=gen)
    y = torch.randn(48, 3, generator=gen)
    return model, x, y


CFG = LayerSelectionConfig(draws=300, samples=48, seed=0)


def test_candidates_skip_grouped_conv_and_activations():
    assert candidate_layers(ThreePaths()) == ["conv", "small", "big"]


def test_dominant_layer_ranks_first_and_scores_are_consistent():
    model, x, y = make_problem()
    scores = rank_layers(model, x, y, squared_error, CFG)
    assert [s.name for s in scores][0] == "big"
    assert scores[0].entropy > scores[1].entropy + 3.0  # a factor ~e^3 in loss spread at least
    assert [s.entropy for s in scores] == sorted((s.entropy for s in scores), reverse=True)
    by_name = {s.name: s for s in scores}
    assert by_name["conv"] == LayerScore(
        "conv", "Conv2d", (4, 1, 3, 3), by_name["conv"].entropy, by_name["conv"].loss_mean, by_name["conv"].loss_std
    )
    assert by_name["big"].kind == "Linear" and by_name["big"].shape == (3, 36)
    with torch.no_grad():
        base_loss = float(squared_error(model(x), y).mean())
    for s in scores:  # losses are around the unperturbed one and spread
        assert s.loss_std > 0
        assert abs(s.loss_mean - base_loss) < 0.5 * base_loss


def test_seeded_reproducibility_and_chunk_independence():
    model, x, y = make_problem()
    first = rank_layers(model, x, y, squared_error, CFG)
    again = rank_layers(model, x, y, squared_error, CFG)
    assert first == again
    chunked = rank_layers(model, x, y, squared_error, LayerSelectionConfig(draws=300, samples=48, seed=0, chunk=64))
    for a, b in zip(first, chunked, strict=True):
        assert a.name == b.name
        assert a.entropy == pytest.approx(b.entropy, rel=1e-5, abs=1e-5)
    other = rank_layers(model, x, y, squared_error, LayerSelectionConfig(draws=300, samples=48, seed=1))
    assert [s.entropy for s in other] != [s.entropy for s in first]
    assert other[0].name == first[0].name == "big"
    # A layer's scores do not depend on which other layers are ranked.
    (alone,) = rank_layers(model, x, y, squared_error, CFG, layers=["small"])
    assert alone == next(s for s in first if s.name == "small")


def test_model_is_left_unchanged():
    model, x, y = make_problem()
    model.train()
    model.act.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    rank_layers(model, x, y, squared_error, CFG, progress=lambda name, n: calls.append((name, n)))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and model.conv.training and not model.act.training
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert {name for name, _ in calls} == {"conv", "small", "big"}
    assert sum(n for name, n in calls if name == "big") == CFG.draws


def test_hook_fallback_matches_vmap():
    model, x, y = make_problem()
    hostile, _, _ = make_problem(VmapHostile)
    hostile.load_state_dict(model.state_dict())
    with pytest.raises(RuntimeError):  # the premise: this model cannot run under vmap
        torch.vmap(lambda w: torch.func.functional_call(hostile, {"conv.weight": w}, (x,)))(
            hostile.conv.weight.expand(2, -1, -1, -1, -1)
        )
    cfg = LayerSelectionConfig(draws=100, samples=48, seed=0)
    expected = rank_layers(model, x, y, squared_error, cfg)
    got = rank_layers(hostile, x, y, squared_error, cfg)
    for a, b in zip(expected, got, strict=True):
        assert a.name == b.name
        assert a.entropy == pytest.approx(b.entropy, rel=1e-4, abs=1e-4)
        assert a.loss_mean == pytest.approx(b.loss_mean, rel=1e-5)


def test_conv_layer_of_classifier_and_bad_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, padding_mode="reflect"), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 25, 4)).eval()
    x, y = torch.randn(16, 1, 5, 5), torch.randint(0, 4, (16,))

    def cross_entropy(out, label):
        return F.cross_entropy(out, label, reduction="none")

    scores = rank_layers(model, x, y, cross_entropy, LayerSelectionConfig(draws=50, samples=16))
    assert {s.name for s in scores} == {"0", "3"}
    assert all(math.isfinite(s.entropy) for s in scores)
    with pytest.raises(OcdError, match="per sample"):
        rank_layers(model, x, y, lambda o, t: cross_entropy(o, t).mean(), LayerSelectionConfig(draws=4, samples=16))
    with pytest.raises(OcdError, match="not in the model"):
        rank_layers(model, x, y, cross_entropy, CFG, layers=["9"])
    with pytest.raises(OcdError, match="draws"):
        LayerSelectionConfig(draws=1)
    with pytest.raises(OcdError, match="scale"):
        LayerSelectionConfig(scale=0.0)


@pytest.fixture(scope="module")
def digits_base(tmp_path_factory):
    from ocd.stages.base import run_base

    ctx = Context("digits", Cache(tmp_path_factory.mktemp("cache")), show_progress=False)
    cfg = build_config(BaseConfig, ctx.task.defaults.get("base"), {"epochs": 3})
    return ctx, run_base(ctx, cfg)


def test_resolve_layer_names(digits_base):
    ctx, base = digits_base
    assert resolve_layer(ctx, base, "", CFG) == ctx.task.layer == "2"
    assert resolve_layer(ctx, base, "4", CFG) == "4"
    with pytest.raises(OcdError, match=r"'nope' is not in the model \(candidates: 0, 2, 4\)"):
        resolve_layer(ctx, base, "nope", CFG)
    with pytest.raises(OcdError, match=r"'1' is a ReLU.*candidates: 0, 2, 4"):
        resolve_layer(ctx, base, "1", CFG)
    with pytest.raises(OcdError) as info:
        resolve_layer(ctx, base, "2.weight", CFG)
    assert "\n" not in str(info.value)


def test_select_layer_stage_on_digits(digits_base):
    ctx, base = digits_base
    cfg = LayerSelectionConfig(draws=200, samples=128, seed=0)
    scores = select_layer(ctx, base, cfg)
    assert sorted(s.name for s in scores) == ["0", "2", "4"]
    assert resolve_layer(ctx, base, "auto", cfg) == scores[0].name
    report = ranking_json(scores, cfg, default_layer=ctx.task.layer)
    assert report["chosen"] == scores[0].name and report["default"] == "2"
    assert [row["rank"] for row in report["layers"]] == [1, 2, 3]
    assert set(report["layers"][0]) == {"name", "kind", "shape", "entropy", "loss_mean", "loss_std", "rank"}
    assert report["config"] == {"draws": 200, "scale": 0.1, "samples": 128, "seed": 0, "chunk": 0}
    import json

    json.dumps(report, allow_nan=False)
    table = ranking_table(scores, default_layer="2")
    assert table.row_count == 3
