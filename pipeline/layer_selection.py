"""Choosing the layer to overfit: the entropy of the training loss under random weight perturbations.

The paper (Lutati & Wolf, "Layer choice") overfits the layer whose random weight perturbations
give the highest entropy of the training loss; the public code has no such routine (the layer is
named in a config). This module implements it without backpropagation:

1. For one candidate layer at a time (every ``nn.Linear`` and ``nn.Conv2d`` with ``groups == 1``),
   draw ``cfg.draws`` perturbed weights ``W + scale * std(W) * eps`` with ``eps ~ N(0, I)``; every
   other parameter keeps its value and the bias is not perturbed.
2. For each draw, the training loss: the mean per-sample loss over a fixed set of training samples.
3. A Gaussian kernel density estimate over those loss values, and its differential entropy
   (:func:`gaussian_kde_entropy`). Layers are ranked by it, highest first.

Perturbation size. The paper's description (see the project's digest) gives no noise level.
Here the standard deviation of the noise is ``scale`` (default 0.1) times the standard deviation
of the layer's own weight, so every layer is shaken by the same *relative* amount whatever its
fan-in and initialisation; an absolute noise level would favour layers with large fan-in or large
weights. (If a weight is constant its RMS is used, and 1 if it is zero.) The entropy is in nats of
the loss's own units, so scores compare layers of one model and one loss, not across tasks.

Cost and defaults. Every draw is an exact forward pass over ``samples`` training samples of the
network downstream of the layer, so the cost is ``draws * samples`` partial forwards per layer and
the early convolutions dominate. The defaults (1,000 draws, 128 samples; the paper uses ~10,000
draws) rank LeNet5's five layers in about half a minute on two CPU cores; with 2,000 x 512 it takes
minutes. For a near-Gaussian loss spread the entropy is about ``log(loss_std) + 1.42``; its
estimate from n draws has a standard error of roughly ``0.7 / sqrt(n)`` nats.

Evaluation is vectorised: a chunk of draws runs at once under ``torch.vmap`` over
``torch.func.functional_call`` with the perturbed weight as the batched argument. Everything
upstream of the layer is unbatched under vmap and so computed once per chunk. ``cfg.chunk = 0``
(auto) sizes chunks from the activation memory one forward pass shows (about
``AUTO_CHUNK_BYTES``), which for late layers means a single chunk. If the model cannot run under
vmap (data-dependent Python control flow, ``.item()``, in-place updates of unbatched tensors), a
fallback repeats the samples once per draw along the batch dimension and lets a forward hook apply
draw ``k``'s weight to copy ``k`` (batch-first activations, one call of the layer per forward); the
results are the same up to float rounding.

Reproducibility: each layer's draws come from its own CPU ``torch.Generator`` seeded from
``(cfg.seed, layer name)``, one weight at a time, so a layer's draws do not depend on the chunk
size, the device or which other layers are ranked (its scores then agree up to float rounding).
The caller's model is left as it was (same weights, training flags and hooks); it runs in eval
mode and without autograd for the duration of the call.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .errors import OcdError

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss_fn(output, target) -> per-sample loss of shape (B,)`` (no reduction)."""

ProgressFn = Callable[[str, int], None]
"""``progress(layer_name, draws_just_evaluated)``, called after every chunk."""

SUPPORTED = (nn.Linear, nn.Conv2d)
AUTO_CHUNK_BYTES = 512 * 2**20  #: activation memory aimed at by chunk = 0 (auto)


@dataclass(frozen=True)
class LayerSelectionConfig:
    """Layer selection by loss entropy under random weight perturbations."""

    draws: int = 1000  #: perturbation draws per layer (paper: ~10,000)
    scale: float = 0.1  #: noise std relative to the std of the layer's weight
    samples: int = 128  #: training samples in the loss (mean per-sample loss)
    seed: int = 0  #: seed of the draws (and of the stage's sample choice)
    #: draws evaluated at once; 0 = auto (a memory budget). A runtime field: no effect on results.
    chunk: int = field(default=0, metadata={"runtime": True})

    def __post_init__(self) -> None:
        if self.draws < 2:
            raise OcdError(f"layer selection: draws must be at least 2, got {self.draws}")
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise OcdError(f"layer selection: scale must be positive, got {self.scale}")
        if self.samples < 1:
            raise OcdError(f"layer selection: samples must be positive, got {self.samples}")
        if self.chunk < 0:
            raise OcdError(f"layer selection: chunk must be >= 0 (0 = auto), got {self.chunk}")


@dataclass(frozen=True)
class LayerScore:
    """One layer's result. ``entropy`` is ``-inf`` when the perturbations never change the loss."""

    name: str  #: dotted module name (``model.get_submodule(name)``)
    kind: str  #: "Linear" or "Conv2d"
    shape: tuple[int, ...]  #: shape of the weight
    entropy: float  #: differential entropy (nats) of the KDE of the perturbed training losses
    loss_mean: float  #: mean of the perturbed training losses
    loss_std: float  #: standard deviation of the perturbed training losses


def _is_supported(module: nn.Module) -> bool:
    return isinstance(module, SUPPORTED) and getattr(module, "groups", 1) == 1


def candidate_layers(model: nn.Module) -> list[str]:
    """Names of the model's ``nn.Linear`` and ``nn.Conv2d`` (groups == 1) modules, in model order."""
    return [name for name, module in model.named_modules() if name and _is_supported(module)]


def check_layer(model: nn.Module, name: str) -> nn.Module:
    """The module called `name`; an :class:`OcdError` listing the candidates if it is not one."""
    candidates = candidate_layers(model)
    shown = ", ".join(candidates) if candidates else "none"
    try:
        module = model.get_submodule(name) if name else None
    except AttributeError:
        module = None
    if module is None:
        raise OcdError(f"layer {name!r} is not in the model (candidates: {shown})")
    if not _is_supported(module):
        raise OcdError(
            f"layer {name!r} is a {type(module).__name__}; only Linear and Conv2d (groups=1) "
            f"layers can be overfitted (candidates: {shown})"
        )
    return module


def gaussian_kde_entropy(values: Tensor, block: int = 1024) -> float:
    """Differential entropy (nats) of a 1-D Gaussian kernel density estimate of `values`.

    The resubstitution estimate ``H = -mean_i log p_hat(x_i)`` with
    ``p_hat(x) = 1/(n h) sum_j phi((x - x_j) / h)`` over all n points (the point itself included),
    and Scott's bandwidth ``h = sigma_hat * n ** (-1/5)`` (``sigma_hat`` with ddof 1): the
    density ``scipy.stats.gaussian_kde`` builds by default. For a normal sample it approaches
    ``0.5 * log(2 pi e sigma^2)``, slightly above it (the kernel adds ``h^2`` to the variance). Computed in
    float64, `block` rows of the n x n kernel matrix at a time. Returns ``-inf`` if all values are
    equal; raises ``ValueError`` for fewer than two values or non-finite ones.
    """
    x = values.detach().reshape(-1).to("cpu", torch.float64)
    n = x.numel()
    if n < 2:
        raise ValueError(f"need at least two values for a density estimate, got {n}")
    if not torch.isfinite(x).all():
        raise ValueError("values must be finite")
    sigma = float(x.std())
    if sigma == 0.0:
        return -math.inf
    h = sigma * n ** (-0.2)
    total = 0.0
    for start in range(0, n, block):
        z = (x[start : start + block, None] - x[None, :]) / h
        total += float(torch.logsumexp(-0.5 * z * z, dim=1).sum())
    log_norm = math.log(n * h * math.sqrt(2 * math.pi))
    return -(total / n - log_norm)


def _layer_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"ocd-layer-selection:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _noise_std(weight: Tensor) -> float:
    w = weight.detach().double()
    std = float(w.std()) if w.numel() > 1 else 0.0
    if std == 0.0:
        std = float(w.pow(2).mean().sqrt())
    return std if std > 0.0 else 1.0


def _vmap_losses(model: nn.Module, key: str, weights: Tensor, inputs: Tensor, targets: Tensor, loss_fn: LossFn):
    """(K, B) per-sample losses, the whole network under vmap over the K weights."""

    def per_draw(weight: Tensor) -> Tensor:
        return loss_fn(functional_call(model, {key: weight}, (inputs,)), targets)

    return torch.vmap(per_draw)(weights)


def _layer_fn(module: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    if isinstance(module, nn.Conv2d):
        return lambda x, w: module._conv_forward(x, w, module.bias)
    return lambda x, w: F.linear(x, w, module.bias)


def _hook_losses(model: nn.Module, module: nn.Module, weights: Tensor, inputs: Tensor, targets: Tensor, loss_fn):
    """(K, B) per-sample losses: samples repeated K times, a hook applies weight k to copy k."""
    k, b = weights.shape[0], inputs.shape[0]
    layer = torch.vmap(_layer_fn(module))

    def hook(_module: nn.Module, args: tuple, _output: Tensor) -> Tensor:
        x = args[0]
        out = layer(x.reshape(k, b, *x.shape[1:]), weights)
        return out.reshape(k * b, *out.shape[2:])

    handle = module.register_forward_hook(hook)
    try:
        output = model(inputs.repeat(k, *([1] * (inputs.dim() - 1))))
    finally:
        handle.remove()
    return loss_fn(output, targets.repeat(k, *([1] * (targets.dim() - 1)))).reshape(k, b)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _output_bytes(output: object) -> int:
    if isinstance(output, Tensor):
        return output.numel() * output.element_size()
    if isinstance(output, (tuple, list)):
        return sum(_output_bytes(o) for o in output)
    if isinstance(output, dict):
        return sum(_output_bytes(o) for o in output.values())
    return 0


def _module_calls(model: nn.Module, inputs: Tensor) -> list[tuple[nn.Module, int]]:
    """(module, output bytes) of every leaf-module call of one forward on `inputs`, in call order."""
    calls: list[tuple[nn.Module, int]] = []
    handles = [
        m.register_forward_hook(lambda mod, _args, out: calls.append((mod, _output_bytes(out))))
        for m in model.modules()
        if next(m.children(), None) is None
    ]
    try:
        model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _auto_chunk(calls: list[tuple[nn.Module, int]], module: nn.Module, inputs: Tensor, mode: str) -> int:
    """Draws per chunk that keep the estimated activation memory near AUTO_CHUNK_BYTES.

    Under vmap only the layer and what follows it are batched over draws; the hook fallback
    repeats the whole forward. Functional ops between modules (ReLU, pooling written as
    ``F.*``) are not seen by hooks: the estimate is the seen bytes times four, plus the weight.
    """
    first = next((i for i, (m, _) in enumerate(calls) if m is module), 0)
    seen = sum(size for _, size in calls[first if mode == "vmap" else 0 :])
    if mode != "vmap":
        seen += inputs.numel() * inputs.element_size()
    per_draw = 4 * seen + 2 * module.weight.numel() * module.weight.element_size()
    return max(1, AUTO_CHUNK_BYTES // max(per_draw, 1))


def _draw_losses(
    model: nn.Module,
    name: str,
    inputs: Tensor,
    targets: Tensor,
    loss_fn: LossFn,
    cfg: LayerSelectionConfig,
    calls: list[tuple[nn.Module, int]],
    progress: ProgressFn | None,
    mode: str,
) -> tuple[Tensor, str]:
    """The cfg.draws training losses of layer `name` (float64, CPU) and the mode that worked."""
    module = model.get_submodule(name)
    weight = module.weight.detach()
    std = cfg.scale * _noise_std(weight)
    generator = torch.Generator().manual_seed(_layer_seed(cfg.seed, name))
    losses = torch.empty(cfg.draws, dtype=torch.float64)
    chunk = cfg.chunk or _auto_chunk(calls, module, inputs, mode)
    key = f"{name}.weight"

    def perturbed(noise: Tensor) -> Tensor:
        return weight + std * noise.to(weight.device)

    start = 0
    while start < cfg.draws:
        count = min(chunk, cfg.draws - start)
        noise = torch.empty(count, *weight.shape, dtype=weight.dtype)
        for i in range(count):  # one generator call per draw: the stream does not depend on chunk
            torch.randn(weight.shape, generator=generator, dtype=weight.dtype, out=noise[i])
        per_sample = None
        if mode == "vmap":
            try:
                per_sample = _vmap_losses(model, key, perturbed(noise), inputs, targets, loss_fn)
            except Exception:  # the model cannot run under vmap: use the hook from now on
                mode = "hook"
                chunk = cfg.chunk or _auto_chunk(calls, module, inputs, mode)
        if per_sample is None:
            parts = noise.split(chunk)  # smaller than the vmap chunk after a fallback
            per_sample = torch.cat([_hook_losses(model, module, perturbed(p), inputs, targets, loss_fn) for p in parts])
        if per_sample.shape != (count, len(inputs)):
            raise OcdError(
                f"layer selection: the loss must be per sample, shape ({len(inputs)},); "
                f"got {tuple(per_sample.shape[1:])}"
            )
        losses[start : start + count] = per_sample.double().mean(dim=1).cpu()
        start += count
        if progress is not None:
            progress(name, count)
    return losses, mode


@torch.no_grad()
def rank_layers(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    loss_fn: LossFn,
    cfg: LayerSelectionConfig,
    layers: Sequence[str] | None = None,
    progress: ProgressFn | None = None,
) -> list[LayerScore]:
    """Score `layers` (default: :func:`candidate_layers`) by loss entropy, highest first.

    `inputs` and `targets` are the fixed training samples (all used at once, moved to the model's
    device); `loss_fn(output, target)` returns per-sample losses. Ties keep model order.
    `progress(layer_name, n)` is called after every chunk of n draws.
    """
    names = list(candidate_layers(model) if layers is None else layers)
    if not names:
        raise OcdError("the model has no Linear or Conv2d (groups=1) layer to choose from")
    modules = [check_layer(model, name) for name in names]
    device = modules[0].weight.device
    inputs, targets = inputs.to(device), targets.to(device)
    scores = []
    mode = "vmap"
    with _eval_mode(model):
        calls = _module_calls(model, inputs) if cfg.chunk == 0 else []
        for name, module in zip(names, modules, strict=True):
            losses, mode = _draw_losses(model, name, inputs, targets, loss_fn, cfg, calls, progress, mode)
            bad = int((~torch.isfinite(losses)).sum())
            if bad:
                raise OcdError(
                    f"layer selection: {bad} of {cfg.draws} perturbed losses of layer {name!r} are not "
                    f"finite; use a smaller scale (now {cfg.scale})"
                )
            scores.append(
                LayerScore(
                    name=name,
                    kind=_kind(module),
                    shape=tuple(module.weight.shape),
                    entropy=gaussian_kde_entropy(losses),
                    loss_mean=float(losses.mean()),
                    loss_std=float(losses.std()),
                )
            )
    return sorted(scores, key=lambda s: -s.entropy)


def _kind(module: nn.Module) -> str:
    return "Conv2d" if isinstance(module, nn.Conv2d) else "Linear"
