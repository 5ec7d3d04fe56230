"""Running a model with a different weight change on its chosen layer for every sample."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


def _delta_output(module: nn.Module, x: Tensor, deltas: Tensor) -> Tensor:
    """The extra layer output caused by per-sample weight changes `deltas` (B, *weight.shape)."""
    if isinstance(module, nn.Linear):
        return torch.einsum("b...i,boi->b...o", x, deltas.to(x.dtype))
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        padding = module.padding
        if module.padding_mode != "zeros":
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
            padding = 0
        b = x.shape[0]
        out = F.conv2d(
            x.reshape(1, -1, *x.shape[2:]),  # samples as groups: one kernel change per sample
            deltas.reshape(-1, *deltas.shape[2:]).to(x.dtype),
            stride=module.stride,
            padding=padding,
            dilation=module.dilation,
            groups=b,
        )
        return out.reshape(b, -1, *out.shape[2:])
    raise ValueError(f"cannot apply a weight change to a {type(module).__name__}")


@torch.no_grad()
def outputs_with_deltas(model: nn.Module, layer: str, inputs: Tensor, deltas: Tensor | None) -> Tensor:
    """Network outputs where sample b uses weight ``W + deltas[b]`` on `layer` (None: the base model).

    A forward hook adds the change's contribution ``deltas[b] x_b`` to the layer's output, so any
    model works unchanged; the model must be in eval mode for samples to stay independent.
    """
    if deltas is None:
        return model(inputs)
    module = model.get_submodule(layer)
    handle = module.register_forward_hook(lambda mod, args, out: out + _delta_output(mod, args[0], deltas))
    try:
        return model(inputs)
    finally:
        handle.remove()
