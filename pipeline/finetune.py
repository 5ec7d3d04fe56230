"""Per-sample overfitting of one layer's weight: the data-generating kernel of stage one.

For every training sample, OCD finetunes the weight (never the bias) of one named ``nn.Linear`` or
``nn.Conv2d`` (groups=1) of a frozen base model with a few Adam steps on that sample alone, and
records the weight change together with the layer's input/output and the network output.

``finetune_reference_loop`` does this literally (deepcopy + ``torch.optim.Adam`` per sample).
``finetune_per_sample`` / ``PerSampleFinetuner`` do all samples of a batch at once, with results
equal to the loop up to float rounding:

- The layer is viewed as a per-sample matrix product ``z_b = W_b X_b + bias`` (``X_b`` are the
  layer's input vectors; for Conv2d the unfolded patches), with ``W_b`` of shape (B, out, K).
- The frozen prefix (everything the layer input depends on) runs once. With torch.fx the model is
  traced and only the nodes downstream of the layer are re-evaluated at each step, values they use
  from elsewhere (skip connections) being cached. If tracing fails (e.g. data-dependent Python
  control flow), the layer is not one traced call, or an op after the layer changes in place a
  value that does not depend on it, a forward hook that replaces the layer's output runs the whole
  network at every step instead: same results, slower. The fx path trusts the traced graph: a
  forward with side effects or randomness fx cannot see needs ``trace=False``.
- Autograd only goes from the loss to ``z``; the weight gradient is ``g_b X_b^T`` and Adam is written
  by hand with ``torch.optim.Adam``'s formula. Per-sample gradients are exact because the model is
  in eval mode (samples are independent) and the total loss is the sum of per-sample losses.
- When each sample's layer input is a single vector ``a`` (Linear on (B, in)), the gradient is an
  outer product ``g a^T`` and Adam's moments stay factored: ``m = M a^T``, ``v = V (a*a)^T`` with
  (B, out) vectors ``M``, ``V``; only the weight itself is materialised as (B, out, in).

The caller's model is left as it was: training flag, ``requires_grad`` and hooks are restored, and
it is put in eval mode for the duration of a call (BatchNorm/Dropout must not mix samples).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss_fn(output, target) -> per-sample loss of shape (B,)`` (no reduction)."""


@dataclass(frozen=True)
class AdamSettings:
    """Adam hyper-parameters of the per-sample finetuning (as ``torch.optim.Adam``).

    Attributes:
        steps: number of Adam steps from the base weight (0 gives a zero delta).
        lr: learning rate.
        beta1: first-moment decay.
        beta2: second-moment decay.
        eps: added to ``sqrt(v_hat)`` in the denominator.
    """

    steps: int = 3
    lr: float = 5e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"Adam steps must be >= 0, got {self.steps}")


@dataclass
class FinetuneResult:
    """Per-sample results; the first dimension of every tensor is the sample.

    Attributes:
        act_in: the layer's input at step 0, as a forward hook sees it.
        act_out: the layer's output at step 0.
        output: the network output at step 0.
        delta: finetuned weight minus base weight, (B, *weight.shape).
        loss_before: per-sample loss at step 0, (B,).
        loss_after: per-sample loss with the finetuned weight, (B,).
    """

    act_in: Tensor
    act_out: Tensor
    output: Tensor
    delta: Tensor
    loss_before: Tensor
    loss_after: Tensor


@dataclass(frozen=True)
class LayerInfo:
    """What the finetuning needs to know about the chosen layer.

    Attributes:
        name: qualified name in the model.
        kind: ``"linear"`` or ``"conv2d"``.
        weight_shape: shape of the layer's weight.
        matrix_shape: (out, K): the weight seen as a matrix (K = in, or C_in*kh*kw for Conv2d).
    """

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    matrix_shape: tuple[int, int]


def weight_as_matrix(weight: Tensor, batch_dims: int = 0) -> Tensor:
    """View a Linear (out, in) or Conv2d (out, C, kh, kw) weight as (out, K), after ``batch_dims``."""
    return weight.flatten(batch_dims + 1)


def describe_layer(model: nn.Module, layer: str) -> LayerInfo:
    """Check that ``layer`` names a supported layer of ``model`` and describe it (ValueError if not)."""
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        raise ValueError(f"model has no layer named {layer!r}") from None
    if isinstance(module, nn.Linear):
        kind = "linear"
    elif isinstance(module, nn.Conv2d) and module.groups == 1:
        kind = "conv2d"
    else:
        what = f"Conv2d with groups={module.groups}" if isinstance(module, nn.Conv2d) else type(module).__name__
        raise ValueError(f"layer {layer!r} is a {what}; only nn.Linear and nn.Conv2d (groups=1) are supported")
    shape = tuple(module.weight.shape)
    return LayerInfo(layer, kind, shape, (shape[0], math.prod(shape[1:])))


class _MatrixView:
    """The layer as per-sample matrix products ``z_b = W_b X_b + bias`` on unfolded inputs."""

    def __init__(self, module: nn.Linear | nn.Conv2d, act_in: Tensor, batch: int):
        if not isinstance(act_in, Tensor) or act_in.dim() < 2 or act_in.shape[0] != batch:
            got = tuple(act_in.shape) if isinstance(act_in, Tensor) else type(act_in).__name__
            raise ValueError(f"the layer's input must be a tensor with the batch first ({batch}, ...), got {got}")
        self.bias = None if module.bias is None else module.bias.detach()
        self.conv = isinstance(module, nn.Conv2d)
        if self.conv:
            if act_in.dim() != 4:
                raise ValueError(f"Conv2d input must be (B, C, H, W), got {tuple(act_in.shape)}")
            x = _conv_pad(module, act_in)
            k, d, s = module.kernel_size, module.dilation, module.stride
            self.out_hw = tuple((x.shape[2 + i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2))
            self.cols = F.unfold(x, k, dilation=d, stride=s)  # (B, C*kh*kw, L)
        else:
            self.lead = act_in.shape[1:-1]
            self.cols = act_in.reshape(batch, -1, act_in.shape[-1])  # (B, N, in)
        self.vector = not self.conv and act_in.dim() == 2

    def apply(self, w: Tensor) -> Tensor:
        """The layer output for per-sample weights ``w`` (B, out, K)."""
        if self.conv:
            z = torch.bmm(w, self.cols)
            if self.bias is not None:
                z = z + self.bias[:, None]
            return z.view(z.shape[0], z.shape[1], *self.out_hw)
        z = torch.bmm(self.cols, w.transpose(1, 2))
        if self.bias is not None:
            z = z + self.bias
        return z.view(z.shape[0], *self.lead, z.shape[-1])

    def grad(self, gz: Tensor) -> Tensor:
        """Per-sample weight gradients (B, out, K) from the gradient ``gz`` of the layer output."""
        if self.conv:
            return torch.bmm(gz.flatten(2), self.cols.transpose(1, 2))
        return torch.bmm(gz.reshape(gz.shape[0], -1, gz.shape[-1]).transpose(1, 2), self.cols)


def _conv_pad(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``x`` padded as ``conv`` pads it (any padding mode, int/tuple/'same'/'valid' padding)."""
    if isinstance(conv.padding, str):
        pads = [0, 0, 0, 0]
        if conv.padding == "same":
            for i in range(2):
                total = conv.dilation[i] * (conv.kernel_size[i] - 1)
                pads[2 * (1 - i)], pads[2 * (1 - i) + 1] = total // 2, total - total // 2
    else:
        pads = [conv.padding[1], conv.padding[1], conv.padding[0], conv.padding[0]]
    if not any(pads):
        return x
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, pads, mode=mode)


@contextlib.contextmanager
def _frozen_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter requiring grad for the duration; the caller's state restored after."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)


class _Root(nn.Module):
    """Traced in place of the model, so that fx stores tensor constants here, not on the model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.m = model

    def forward(self, x: Tensor) -> Tensor:
        return self.m(x)


_INPLACE_OPERATORS = frozenset(
    getattr(operator, name)
    for name in "iadd iand iconcat ifloordiv ilshift imatmul imod imul ior ipow irshift isub itruediv ixor".split()
) | {operator.setitem, operator.delitem}


def _mutated(root: nn.Module, n: fx.Node) -> list[fx.Node]:
    """The input nodes that ``n`` changes in place (in-place ops, ``inplace=True``, ``out=``)."""
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
    if n.op == "call_module":
        inplace = getattr(root.get_submodule(n.target), "inplace", False) is True
    elif n.op in ("call_method", "call_function"):
        inplace = n.target in _INPLACE_OPERATORS or n.kwargs.get("inplace") is True
        inplace = inplace or (name.endswith("_") and not name.startswith("_"))
    else:
        inplace = False
    found = [n.args[0]] if inplace and n.args else []
    return [m for m in [*found, n.kwargs.get("out")] if isinstance(m, fx.Node)]


class _FxPlan:
    """The traced model split at the layer: a prefix run once, a suffix run at every step.

    The prefix runs every node that does not depend on the layer (also those after it in the graph),
    so ``safe`` is False when a node after the layer changes such a value in place: fx graphs do not
    order in-place ops against readers, and that reordering would change what they read.
    """

    def __init__(self, root: _Root, graph: fx.Graph, node: fx.Node):
        self.root, self.node = root, node
        downstream, after = {node}, False
        self.safe = True
        for n in graph.nodes:
            if n.op == "output" or any(p in downstream for p in n.all_input_nodes):
                downstream.add(n)
            if after and any(m not in downstream for m in _mutated(root, n)):
                self.safe = False
            after = after or n is node
        self.prefix = [n for n in graph.nodes if n not in downstream]
        self.suffix = [n for n in graph.nodes if n in downstream and n is not node]
        self.cached = {p for n in self.suffix for p in n.all_input_nodes if p not in downstream}

    @classmethod
    def trace(cls, model: nn.Module, layer: str) -> _FxPlan | None:
        """Trace ``model`` (already in eval mode); None when fx cannot split it at ``layer``."""
        root = _Root(model)
        try:
            graph = fx.Tracer().trace(root)
        except Exception:  # any tracing failure means: use the hook path
            return None
        target = f"m.{layer}" if layer else "m"
        nodes = [n for n in graph.nodes if n.op == "call_module" and n.target == target]
        if len(nodes) != 1 or len(nodes[0].args) != 1 or nodes[0].kwargs:
            return None
        if not isinstance(nodes[0].args[0], fx.Node):
            return None
        plan = cls(root, graph, nodes[0])
        return plan if plan.safe else None

    def _eval(self, n: fx.Node, env: dict[fx.Node, object], x: Tensor) -> object:
        args = fx.node.map_arg(n.args, env.__getitem__)
        kwargs = fx.node.map_arg(n.kwargs, env.__getitem__)
        if n.op == "placeholder":
            return x
        if n.op == "get_attr":
            return functools.reduce(getattr, n.target.split("."), self.root)
        if n.op == "call_module":
            return self.root.get_submodule(n.target)(*args, **kwargs)
        if n.op == "call_method":
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        return args[0]  # output

    def run_prefix(self, x: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """Run the prefix on ``x``; return the layer input and ``suffix(layer_output) -> output``."""
        env: dict[fx.Node, object] = {}
        with torch.no_grad():
            for n in self.prefix:
                env[n] = self._eval(n, env, x)
        act_in = env[self.node.args[0]]
        cache = {n: env[n] for n in self.cached}

        def suffix(z: Tensor) -> Tensor:
            env = {**cache, self.node: z}
            for n in self.suffix:
                env[n] = self._eval(n, env, x)
            return env[self.suffix[-1]]

        return act_in, suffix


def _run_with_hook(model: nn.Module, module: nn.Module, x: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """Hook path: capture the layer input; ``suffix(z)`` reruns the model with the layer output set to z."""
    seen: list[Tensor] = []

    def capture(_mod: nn.Module, args: tuple, _out: Tensor) -> None:
        seen.append(args[0].clone() if args else None)  # clone: the rest may change it in place

    handle = module.register_forward_hook(capture)
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    if len(seen) != 1:
        raise ValueError(f"the layer must be called exactly once per forward, it was called {len(seen)} times")
    if seen[0] is None:
        raise ValueError("the layer must be called with its input as a positional argument")

    def suffix(z: Tensor) -> Tensor:
        handle = module.register_forward_hook(lambda _m, _a, _o: z)
        try:
            return model(x)
        finally:
            handle.remove()

    return seen[0], suffix


class PerSampleFinetuner:
    """Batched per-sample finetuning of one layer of ``model``; reusable across batches.

    Construction checks the layer and traces the model once (``trace=False`` skips fx and always
    uses the hook path). ``factored=False`` disables the factored-Adam fast path (for comparison).
    The model is referenced, not copied: do not change its structure between calls.
    """

    def __init__(self, model: nn.Module, layer: str, *, trace: bool = True, factored: bool = True):
        self.info = describe_layer(model, layer)
        self.model, self.factored = model, factored
        self.module = model.get_submodule(layer)
        self.plan = None
        if trace:
            with _frozen_eval(model):
                self.plan = _FxPlan.trace(model, layer)

    @property
    def traced(self) -> bool:
        """Whether the fx path (prefix computed once) is used."""
        return self.plan is not None

    def __call__(self, inputs: Tensor, targets: Tensor, loss_fn: LossFn, settings: AdamSettings) -> FinetuneResult:
        """Finetune the layer's weight on each sample of ``inputs`` independently."""
        with _frozen_eval(self.model):
            x = inputs.detach()
            if self.plan is not None:
                act_in, suffix = self.plan.run_prefix(x)
            else:
                act_in, suffix = _run_with_hook(self.model, self.module, x)
            view = _MatrixView(self.module, act_in, x.shape[0])
            return self._adam(view, act_in, suffix, targets, loss_fn, settings)

    def _adam(
        self,
        view: _MatrixView,
        act_in: Tensor,
        suffix: Callable[[Tensor], Tensor],
        targets: Tensor,
        loss_fn: LossFn,
        s: AdamSettings,
    ) -> FinetuneResult:
        batch = act_in.shape[0]
        base = weight_as_matrix(self.module.weight.detach())
        w = base.expand(batch, -1, -1).clone()
        factored = self.factored and view.vector
        if factored:
            # m a / (sqrt(v) |a| + eps) == m / (sqrt(v) sign(a) + eps / a): one (B, out, in) pass fewer,
            # and a == 0 gives eps / a = +-inf, hence the exact 0 update.
            a = view.cols[:, 0, :]  # (B, in)
            sign_a, eps_a = a.sign()[:, None, :], (s.eps / a)[:, None, :]
            m = a.new_zeros(batch, base.shape[0])
            v = torch.zeros_like(m)
        else:
            m, v = torch.zeros_like(w), torch.zeros_like(w)
        first: tuple[Tensor, Tensor, Tensor] | None = None
        for t in range(s.steps + 1):
            last = t == s.steps
            with torch.no_grad():
                z = view.apply(w)
            with torch.set_grad_enabled(not last):
                z.requires_grad_(not last)
                out = suffix(z.clone())  # the suffix may work in place on the layer output
                loss = loss_fn(out, targets)
            if loss.shape != (batch,):
                raise ValueError(f"loss_fn must return per-sample losses of shape ({batch},), got {tuple(loss.shape)}")
            if first is None:
                first = (z.detach(), out.detach(), loss.detach())
            if last:
                break
            gz = torch.autograd.grad(loss.sum(), z, allow_unused=True)[0] if loss.requires_grad else None
            gz = torch.zeros_like(z) if gz is None else gz
            with torch.no_grad():
                bc1, bc2_sqrt = 1 - s.beta1 ** (t + 1), math.sqrt(1 - s.beta2 ** (t + 1))
                if factored:
                    g = gz.reshape(batch, -1)
                    m.lerp_(g, 1 - s.beta1)
                    v.mul_(s.beta2).addcmul_(g, g, value=1 - s.beta2)
                    denom = torch.addcmul(eps_a, (v.sqrt() / bc2_sqrt)[:, :, None], sign_a)
                    w.addcdiv_(m[:, :, None], denom, value=-s.lr / bc1)
                else:
                    g = view.grad(gz)
                    m.lerp_(g, 1 - s.beta1)
                    v.mul_(s.beta2).addcmul_(g, g, value=1 - s.beta2)
                    w.addcdiv_(m, (v.sqrt() / bc2_sqrt).add_(s.eps), value=-s.lr / bc1)
        act_out, output, loss_before = first
        delta = (w - base).view(batch, *self.info.weight_shape)
        return FinetuneResult(act_in, act_out, output, delta, loss_before, loss.detach())


def finetune_per_sample(
    model: nn.Module,
    layer: str,
    inputs: Tensor,
    targets: Tensor,
    loss_fn: LossFn,
    settings: AdamSettings,
    *,
    trace: bool = True,
    factored: bool = True,
) -> FinetuneResult:
    """Finetune ``layer``'s weight on each sample of ``inputs`` independently, all at once.

    Equal to ``finetune_reference_loop`` up to float rounding. To process many batches, build one
    ``PerSampleFinetuner`` and call it per batch (the model is traced once).
    """
    return PerSampleFinetuner(model, layer, trace=trace, factored=factored)(inputs, targets, loss_fn, settings)


def finetune_reference_loop(
    model: nn.Module,
    layer: str,
    inputs: Tensor,
    targets: Tensor,
    loss_fn: LossFn,
    settings: AdamSettings,
) -> FinetuneResult:
    """The obviously-correct version: per sample, deepcopy the model and run ``torch.optim.Adam``."""
    describe_layer(model, layer)
    s = settings
    rows: list[tuple[Tensor, ...]] = []
    for i in range(inputs.shape[0]):
        net = copy.deepcopy(model).eval()
        for p in net.parameters():
            p.requires_grad_(False)
        module = net.get_submodule(layer)
        weight = module.weight
        base = weight.detach().clone()
        weight.requires_grad_(True)
        opt = torch.optim.Adam([weight], lr=s.lr, betas=(s.beta1, s.beta2), eps=s.eps)
        seen: list[tuple[Tensor, Tensor]] = []
        handle = module.register_forward_hook(
            lambda _m, a, o, seen=seen: seen.append((a[0].detach().clone(), o.detach().clone()))
        )
        x, y = inputs[i : i + 1].detach(), targets[i : i + 1]
        out = net(x)
        loss = loss_fn(out, y).sum()
        handle.remove()
        first = (*seen[0], out.detach(), loss.detach().reshape(1))
        for t in range(s.steps):
            if t > 0:
                loss = loss_fn(net(x), y).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            after = loss_fn(net(x), y).sum().reshape(1)
        rows.append((*first, (weight.detach() - base)[None], after))
    act_in, act_out, output, loss_before, delta, loss_after = (torch.cat(c) for c in zip(*rows, strict=True))
    return FinetuneResult(act_in, act_out, output, delta, loss_before, loss_after)
