"""Parity of the batched per-sample finetuning with the obviously-correct loop, and its contract."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ocd.pipeline.finetune import (
    AdamSettings,
    FinetuneResult,
    PerSampleFinetuner,
    describe_layer,
    finetune_per_sample,
    finetune_reference_loop,
    weight_as_matrix,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: extra threads only add overhead (and stall badly on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


FIELDS = ("act_in", "act_out", "output", "delta", "loss_before", "loss_after")


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, target, reduction="none")


def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output - target).pow(2).flatten(1).mean(1)


class LeNet5(nn.Module):
    def __init__(self, norm: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.bn = nn.BatchNorm2d(6) if norm else nn.Identity()
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.conv3 = nn.Conv2d(16, 120, 5)
        self.fc1 = nn.Linear(120, 84)
        self.drop = nn.Dropout(0.5) if norm else nn.Identity()
        self.fc2 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(torch.relu(self.bn(self.conv1(x))), 2)
        x = F.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.conv3(x)).flatten(1)
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


class PointSet(nn.Module):
    """A Linear layer applied to every point of a set, then a reduction over the points."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.lin = nn.Linear(8, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.lin(torch.sin(self.embed(x)))).mean(1))


class Skip(nn.Module):
    """The layer sits inside a skip connection; the tensor in a tuple becomes an fx constant."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 12)
        self.layer = nn.Linear(12, 12)
        self.out = nn.Linear(12, 3)
        self.consts = (torch.tensor(0.5),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        y = self.layer(h)
        return self.out(torch.relu(y) + self.consts[0] * h + h.sum(-1, keepdim=True))


class InPlace(nn.Module):
    """In-place ops after the layer: on values computed from its output, or on a value that is not."""

    def __init__(self, on_prefix: bool) -> None:
        super().__init__()
        self.on_prefix = on_prefix
        self.inp = nn.Linear(6, 12)
        self.layer = nn.Linear(12, 12)
        self.relu = nn.ReLU(inplace=True)
        self.out = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        s = h * 2
        y = self.relu(self.layer(h))
        if self.on_prefix:  # fx records no dependency of `out` on the layer: the model is not split
            s.add_(y)  # a method: fx would turn `s += y` into `s = s + y`
            return self.out(s)
        y = y * 3  # ReLU's backward needs its output unchanged
        y.add_(s)
        return self.out(y)


class ConvNet(nn.Module):
    def __init__(self, **conv: object) -> None:
        super().__init__()
        self.pre = nn.Conv2d(2, 3, 3, padding=1)
        self.conv = nn.Conv2d(3, 5, **{"kernel_size": 3, **conv})
        self.head = nn.LazyLinear(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(torch.tanh(self.pre(x)))).flatten(1))


class Untraceable(nn.Module):
    """Data-dependent Python control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 7)
        self.b = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(torch.isfinite(x).all()):
            x = torch.tanh(self.a(x))
        return self.b(x)


Case = tuple[nn.Module, str, torch.Tensor, torch.Tensor, Callable, bool]


def make_case(name: str) -> Case:
    """(model, layer, inputs, targets, loss_fn, traceable) for a named scenario; 6 samples each."""
    torch.manual_seed(0)
    b = 6
    if name == "lenet-fc1":
        return LeNet5(), "fc1", torch.randn(b, 1, 28, 28), torch.randint(0, 10, (b,)), cross_entropy, True
    if name == "mlp-mse":
        mlp = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))
        return mlp, "2", torch.randn(b, 4), torch.randn(b, 3), mse, True
    if name == "pointset":
        return PointSet(), "lin", torch.randn(b, 10, 3), torch.randn(b, 2), mse, True
    if name == "skip":
        return Skip(), "layer", torch.randn(b, 6), torch.randint(0, 3, (b,)), cross_entropy, True
    if name.startswith("inplace"):
        traceable = name == "inplace-suffix"
        model = InPlace(on_prefix=not traceable)
        return model, "layer", torch.randn(b, 6), torch.randint(0, 3, (b,)), cross_entropy, traceable
    if name.startswith("conv"):
        conv = {
            "conv-stride-pad": dict(stride=2, padding=1),
            "conv-same-dilation": dict(kernel_size=(4, 3), padding="same", dilation=(1, 2)),  # uneven padding
            "conv-reflect-nobias": dict(stride=(2, 1), padding=(1, 2), padding_mode="reflect", bias=False),
        }[name]
        model, x = ConvNet(**conv), torch.randn(b, 2, 9, 8)
        model(x)  # materialise the lazy head
        return model, "conv", x, torch.randint(0, 4, (b,)), cross_entropy, True
    if name == "untraceable":
        return Untraceable(), "a", torch.randn(b, 5), torch.randint(0, 3, (b,)), cross_entropy, False
    raise KeyError(name)


CASES = [
    "lenet-fc1",
    "mlp-mse",
    "pointset",
    "skip",
    "inplace-suffix",
    "inplace-prefix",
    "conv-stride-pad",
    "conv-same-dilation",
    "conv-reflect-nobias",
    "untraceable",
]
SETTINGS = AdamSettings(steps=3, lr=1e-2)


def assert_same(got: FinetuneResult, want: FinetuneResult, atol: float = 1e-6) -> None:
    for field in FIELDS:
        a, b = getattr(got, field), getattr(want, field)
        assert a.shape == b.shape, field
        torch.testing.assert_close(a, b, rtol=1e-5, atol=atol, msg=lambda m, f=field: f"{f}: {m}")


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("name", CASES)
def test_parity_with_reference_loop(name: str) -> None:
    model, layer, x, y, loss_fn, traceable = make_case(name)
    model.eval()
    want = finetune_reference_loop(model, layer, x, y, loss_fn, SETTINGS)
    assert want.delta.abs().max() > 1e-3  # the finetuning did something
    assert PerSampleFinetuner(model, layer).traced == traceable
    for kwargs in ({}, {"trace": False}, {"factored": False}):
        assert_same(finetune_per_sample(model, layer, x, y, loss_fn, SETTINGS, **kwargs), want)


@pytest.mark.parametrize("name", ["lenet-fc1", "pointset", "conv-stride-pad"])
def test_parity_float64(name: str) -> None:
    model, layer, x, y, loss_fn, _ = make_case(name)
    model.double().eval()
    want = finetune_reference_loop(model, layer, x.double(), y, loss_fn, SETTINGS)
    got = finetune_per_sample(model, layer, x.double(), y, loss_fn, SETTINGS)
    assert got.delta.dtype == torch.float64
    assert_same(got, want, atol=1e-12)


def test_result_shapes() -> None:
    model, layer, x, y, loss_fn, _ = make_case("pointset")
    r = finetune_per_sample(model.eval(), layer, x, y, loss_fn, AdamSettings())
    assert r.act_in.shape == (6, 10, 8) and r.act_out.shape == (6, 10, 16) and r.output.shape == (6, 2)
    assert r.delta.shape == (6, 16, 8) and r.loss_before.shape == r.loss_after.shape == (6,)
    model, layer, x, y, loss_fn, _ = make_case("conv-stride-pad")
    r = finetune_per_sample(model.eval(), layer, x, y, loss_fn, AdamSettings())
    assert r.act_in.shape == (6, 3, 9, 8) and r.act_out.shape == (6, 5, 5, 4) and r.delta.shape == (6, 5, 3, 3, 3)
    assert describe_layer(model, "conv").matrix_shape == (5, 27)
    assert weight_as_matrix(r.delta, batch_dims=1).shape == (6, 5, 27)


def test_zero_steps_gives_zero_delta() -> None:
    model, layer, x, y, loss_fn, _ = make_case("skip")
    r = finetune_per_sample(model.eval(), layer, x, y, loss_fn, AdamSettings(steps=0))
    assert not r.delta.any()
    torch.testing.assert_close(r.loss_after, r.loss_before)
    with pytest.raises(ValueError):
        AdamSettings(steps=-1)


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.mark.parametrize("trace", [True, False])
def test_callers_model_is_unchanged(trace: bool) -> None:
    torch.manual_seed(0)
    model = LeNet5(norm=True)
    model.train()
    model.conv1.weight.requires_grad_(False)
    model.fc2.eval()
    x, y = torch.randn(5, 1, 28, 28), torch.randint(0, 10, (5,))
    model(x)  # move the BatchNorm running statistics away from their initial values
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    attrs, hooks = set(vars(model)), hook_count(model)

    got = finetune_per_sample(model, "fc1", x, y, cross_entropy, SETTINGS, trace=trace)
    loop = finetune_reference_loop(model, "fc1", x, y, cross_entropy, SETTINGS)

    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert set(vars(model)) == attrs and hook_count(model) == hooks
    assert_same(got, loop)  # the loop runs an eval() copy: the kernel must have run in eval mode too


def test_unknown_or_unsupported_layer_raises() -> None:
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    x, y = torch.randn(2, 2, 5, 5), torch.randint(0, 3, (2,))
    model(x)
    for layer, words in [("9", "no layer"), ("1", "ReLU"), ("0", "groups=2"), ("", "Sequential")]:
        for fn in (finetune_per_sample, finetune_reference_loop):
            with pytest.raises(ValueError, match=words):
                fn(model, layer, x, y, cross_entropy, SETTINGS)


def test_layer_called_twice_or_bad_loss_raises() -> None:
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.Tanh(), shared)
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="exactly once"):
        finetune_per_sample(model, "0", x, y, mse, SETTINGS)
    mlp = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="per-sample losses"):
        finetune_per_sample(mlp, "0", x, y, lambda o, t: mse(o, t).sum(), SETTINGS)


def test_loss_decreases_on_a_trained_model() -> None:
    torch.manual_seed(0)
    centers = torch.randn(4, 10)
    labels = torch.randint(0, 4, (512,))
    data = centers[labels] + 1.5 * torch.randn(512, 10)  # overlapping classes: no loss is ~0
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(50):
        opt.zero_grad()
        F.cross_entropy(model(data), labels).backward()
        opt.step()
    model.eval()
    x, y = data[:128], labels[:128]
    r = finetune_per_sample(model, "2", x, y, cross_entropy, AdamSettings(steps=5, lr=1e-2))
    resolved = r.loss_before > 1e-3  # float32 cannot show a decrease of an almost-zero loss
    assert resolved.sum() > 64
    assert (r.loss_after < r.loss_before)[resolved].float().mean() > 0.9


def test_tracing_leaves_no_attribute_on_the_model() -> None:
    model, layer, x, y, loss_fn, _ = make_case("skip")  # fx stores `consts[0]` as a constant
    attrs = set(vars(model))
    finetune_per_sample(model.eval(), layer, x, y, loss_fn, SETTINGS)
    assert set(vars(model)) == attrs
    torch.fx.symbolic_trace(model)  # what plain tracing would have done
    assert set(vars(model)) != attrs
