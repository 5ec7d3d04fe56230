"""Conditioning signals: standardisation and the per-signal encoders shared by the denoiser and scale model.

OCD conditions on signals of very different scales (a layer's input and output activations, the
network's logits). Each model standardises every signal feature-wise with statistics fitted on
training data (:class:`ConditionNormalizer`). The statistics are buffers, so they travel with the
model's ``state_dict`` and its EMA copy. Feature-wise standardisation (rather than a LayerNorm over
a sample's features) keeps a sample's overall activation magnitude, which carries information about
the size of its weight delta. Until :meth:`ConditionNormalizer.fit` is called the normaliser is the
identity.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

Tensor = torch.Tensor
Cond = Mapping[str, Tensor]  #: signal name -> (B, dim) tensor


def check_cond_dims(cond_dims: Mapping[str, int]) -> dict[str, int]:
    """Validate signal names (Python identifiers) and widths (positive); return a plain dict."""
    out = {}
    for name, dim in cond_dims.items():
        if not name.isidentifier():
            raise ValueError(f"conditioning signal names must be identifiers, got {name!r}")
        if int(dim) < 1:
            raise ValueError(f"conditioning signal {name!r} needs a positive width, got {dim}")
        out[name] = int(dim)
    return out


def check_cond(cond: Cond | None, cond_dims: Mapping[str, int]) -> Cond:
    """Raise a clear error unless ``cond`` has exactly the expected signals, each (B, dim)."""
    cond = cond or {}
    if set(cond) != set(cond_dims):
        raise KeyError(f"expected conditioning signals {sorted(cond_dims)}, got {sorted(cond)}")
    for name, dim in cond_dims.items():
        if cond[name].dim() != 2 or cond[name].shape[1] != dim:
            raise ValueError(f"signal {name!r} must be (B, {dim}), got {tuple(cond[name].shape)}")
    return cond


class ConditionNormalizer(nn.Module):
    """Feature-wise ``(c - mean) / std`` per signal, with statistics stored as buffers.

    ``min_std_ratio``: each feature's std is floored at this fraction of its signal's mean std, so
    constant features (dead ReLU units) do not blow up at test time.
    """

    def __init__(self, cond_dims: Mapping[str, int], min_std_ratio: float = 1e-2) -> None:
        super().__init__()
        self.cond_dims = check_cond_dims(cond_dims)
        self.min_std_ratio = min_std_ratio
        for name, dim in self.cond_dims.items():
            self.register_buffer(f"{name}_mean", torch.zeros(dim))
            self.register_buffer(f"{name}_std", torch.ones(dim))
        self.register_buffer("fitted", torch.tensor(False))

    @torch.no_grad()
    def fit(self, data: Cond | Iterable[Cond]) -> ConditionNormalizer:
        """Set the statistics from one mapping of (N, dim) tensors or an iterable of such batches."""
        batches = [data] if isinstance(data, Mapping) else data
        sums: dict[str, list[Tensor]] = {}
        count = 0
        for batch in batches:
            batch = check_cond(batch, self.cond_dims)
            for name in self.cond_dims:
                x = batch[name].detach().to("cpu", torch.float64)
                s = sums.setdefault(name, [torch.zeros(x.shape[1], dtype=torch.float64)] * 2)
                sums[name] = [s[0] + x.sum(0), s[1] + (x * x).sum(0)]
            count += next(iter(batch.values())).shape[0] if batch else 0
        if count < 2:
            raise ValueError("ConditionNormalizer.fit needs at least two samples")
        for name in self.cond_dims:
            mean = sums[name][0] / count
            var = (sums[name][1] / count - mean**2).clamp(min=0.0) * count / (count - 1)
            std = var.sqrt()
            std = std.clamp(min=self.min_std_ratio * float(std.mean()) + 1e-12)
            getattr(self, f"{name}_mean").copy_(mean)
            getattr(self, f"{name}_std").copy_(std)
        self.fitted.fill_(True)
        return self

    def forward(self, cond: Cond) -> dict[str, Tensor]:
        cond = check_cond(cond, self.cond_dims)
        return {
            name: (cond[name] - getattr(self, f"{name}_mean")) / getattr(self, f"{name}_std")
            for name in self.cond_dims
        }


class ConditionEmbedding(nn.Module):
    """normalise -> per-signal Linear+SiLU to ``dim`` -> sum -> Linear (OCD's conditioning code)."""

    def __init__(self, cond_dims: Mapping[str, int], dim: int) -> None:
        super().__init__()
        self.cond_dims = check_cond_dims(cond_dims)
        if not self.cond_dims:
            raise ValueError("ConditionEmbedding needs at least one conditioning signal")
        self.normalizer = ConditionNormalizer(self.cond_dims)
        self.encoders = nn.ModuleDict(
            {name: nn.Sequential(nn.Linear(d, dim), nn.SiLU()) for name, d in self.cond_dims.items()}
        )
        self.proj = nn.Linear(dim, dim)

    def forward(self, cond: Cond) -> Tensor:
        normed = self.normalizer(cond)
        return self.proj(sum(self.encoders[name](normed[name]) for name in self.cond_dims))
