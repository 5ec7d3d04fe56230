"""A DDPM-style U-Net (Ho et al. 2020) over a weight matrix seen as a one-channel image.

The conditioning embedding (see :mod:`.conditioning`) is added to the timestep embedding that every
residual block receives. Weight deltas are zero-padded so that each dimension survives all the
downsamplings (:func:`padded_shape`, :func:`to_image`) and cropped back (:func:`from_image`).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from .conditioning import Cond, ConditionEmbedding, ConditionNormalizer, check_cond_dims

Tensor = torch.Tensor


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of :class:`UNet`. Level ``i`` runs at 1/2**i of the input resolution."""

    channels: int = 128  #: base width; level i has channels * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4)  #: width multiplier per level; len - 1 downsamplings
    num_res_blocks: int = 2  #: residual blocks per level on the way down (one more on the way up)
    attention_levels: tuple[int, ...] = (3,)  #: levels with self-attention after each residual block
    mid_attention: bool = True  #: self-attention between the two bottleneck residual blocks
    attention_heads: int = 1  #: heads of every self-attention layer (must divide its width)
    dropout: float = 0.0  #: dropout inside residual blocks (active in train() mode only)
    norm_groups: int = 32  #: GroupNorm groups, reduced to gcd(norm_groups, width) where needed
    temb_mult: int = 4  #: timestep/conditioning embedding width = temb_mult * channels
    in_channels: int = 1  #: image channels (a weight matrix: 1)
    coord_channels: bool = False  #: append row/column coordinates in [-1, 1] as two extra input channels
    axis_channels: int = 0  #: learned per-row and per-column features of the conditioning, as 2*k input channels
    axis_size: tuple[int, ...] = ()  #: (H, W) canvas the axis features span; required when axis_channels > 0
    axis_signals: tuple[str, ...] = ()  #: (row_signal, col_signal) aligned with the matrix axes, e.g. act_out, act_in
    patch: int = 1  #: patchify stem: the U-Net runs at 1/patch resolution (strided conv in, transposed conv out)
    cond_dims: Mapping[str, int] = field(default_factory=dict)  #: signal name -> width; empty = unconditional

    def __post_init__(self) -> None:
        if not self.channel_mult:
            raise ValueError("channel_mult needs at least one level")
        bad = [lv for lv in self.attention_levels if not 0 <= lv < len(self.channel_mult)]
        if bad:
            raise ValueError(f"attention_levels {bad} outside 0..{len(self.channel_mult) - 1}")
        check_cond_dims(self.cond_dims)

    @property
    def num_downsamplings(self) -> int:
        return len(self.channel_mult) - 1

    @property
    def temb_dim(self) -> int:
        return self.temb_mult * self.channels


def padded_shape(
    weight_shape: tuple[int, int], levels: int, pad_to: int | tuple[int, int] | None = None, patch: int = 1
) -> tuple[int, int]:
    """The smallest (H, W) >= ``weight_shape`` (and >= ``pad_to``) divisible by 2**levels.

    ``pad_to`` (int or pair) forces a larger canvas, e.g. 128 for the paper's 128x128; it must itself be
    divisible by 2**levels and at least the weight's size.
    """
    m = patch * 2**levels
    targets = (pad_to, pad_to) if isinstance(pad_to, int) else (pad_to or (0, 0))
    out = []
    for dim, target in zip(weight_shape, targets, strict=True):
        if target and (target % m or target < dim):
            raise ValueError(f"pad_to {pad_to} must be >= {tuple(weight_shape)} and divisible by {m}")
        out.append(max(-(-dim // m) * m, target))
    return out[0], out[1]


def to_image(delta: Tensor, size: tuple[int, int]) -> Tensor:
    """A (out, in) or (B, out, in) matrix -> (B, 1, H, W), zero-padded at the bottom/right to ``size``."""
    if delta.dim() == 2:
        delta = delta.unsqueeze(0)
    rows, cols = delta.shape[-2:]
    if rows > size[0] or cols > size[1]:
        raise ValueError(f"cannot pad a {rows}x{cols} matrix to {size}")
    return F.pad(delta, (0, size[1] - cols, 0, size[0] - rows)).unsqueeze(1)


def from_image(img: Tensor, shape: tuple[int, int]) -> Tensor:
    """Crop a (B, 1, H, W) image back to (B, out, in) = (B, *shape)."""
    return img[:, 0, : shape[0], : shape[1]]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (B,) -> (B, dim): sines then cosines of geometric frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / max(half - 1, 1))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


def coordinate_grid(x: Tensor) -> Tensor:
    """(B, 2, H, W) row and column coordinates in [-1, 1], on ``x``'s device and dtype."""
    b, _, h, w = x.shape
    rows = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype)
    cols = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"))
    return grid.expand(b, 2, h, w)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + projected embedding, GroupNorm-SiLU-dropout-conv, + (1x1) skip."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = group_norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, cout)
        self.norm2 = group_norm(cout, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Multi-head self-attention over all pixels, residual."""

    def __init__(self, channels: int, heads: int, groups: int) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention_heads {heads} must divide width {channels}")
        self.heads = heads
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """Epsilon-predicting U-Net: ``forward(x (B,1,H,W), t (B,) long, cond {name: (B, d)}) -> (B,1,H,W)``.

    H and W must be divisible by 2**config.num_downsamplings (see :meth:`image_shape`).
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = c = config
        emb, g = c.temb_dim, c.norm_groups
        self.time_embed = nn.Sequential(nn.Linear(c.channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.cond_embed = ConditionEmbedding(c.cond_dims, emb) if c.cond_dims else None
        if c.axis_channels and len(c.axis_size) != 2:
            raise ValueError("axis_channels needs axis_size = (H, W), the padded canvas")
        if c.axis_signals and (len(c.axis_signals) != 2 or not set(c.axis_signals) <= set(c.cond_dims)):
            raise ValueError(f"axis_signals must name two conditioning signals of {sorted(c.cond_dims)}")
        if c.axis_channels:
            self.row_features = nn.Linear(emb, c.axis_channels * c.axis_size[0])
            self.col_features = nn.Linear(emb, c.axis_channels * c.axis_size[1])
        cin = c.in_channels + 2 * c.coord_channels + 2 * c.axis_channels + len(c.axis_signals)
        if c.patch > 1:
            self.conv_in = nn.Conv2d(cin, c.channels, c.patch, stride=c.patch)
        else:
            self.conv_in = nn.Conv2d(cin, c.channels, 3, padding=1)

        widths = [c.channels * m for m in c.channel_mult]
        skips, cur = [c.channels], c.channels
        self.down = nn.ModuleList()
        for level, width in enumerate(widths):
            stage = nn.Module()
            stage.blocks, stage.attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(c.num_res_blocks):
                stage.blocks.append(ResBlock(cur, width, emb, c.dropout, g))
                stage.attns.append(self._attn(width, level))
                cur = width
                skips.append(cur)
            stage.resample = Downsample(cur) if level < len(widths) - 1 else nn.Identity()
            if level < len(widths) - 1:
                skips.append(cur)
            self.down.append(stage)

        self.mid1 = ResBlock(cur, cur, emb, c.dropout, g)
        self.mid_attn = AttnBlock(cur, c.attention_heads, g) if c.mid_attention else nn.Identity()
        self.mid2 = ResBlock(cur, cur, emb, c.dropout, g)

        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            stage = nn.Module()
            stage.blocks, stage.attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(c.num_res_blocks + 1):
                stage.blocks.append(ResBlock(cur + skips.pop(), widths[level], emb, c.dropout, g))
                stage.attns.append(self._attn(widths[level], level))
                cur = widths[level]
            stage.resample = Upsample(cur) if level > 0 else nn.Identity()
            self.up.append(stage)

        self.norm_out = group_norm(cur, g)
        if c.patch > 1:
            self.conv_out = nn.ConvTranspose2d(cur, c.in_channels, c.patch, stride=c.patch)
        else:
            self.conv_out = nn.Conv2d(cur, c.in_channels, 3, padding=1)

    def _attn(self, width: int, level: int) -> nn.Module:
        if level in self.config.attention_levels:
            return AttnBlock(width, self.config.attention_heads, self.config.norm_groups)
        return nn.Identity()

    @property
    def normalizer(self) -> ConditionNormalizer | None:
        """The conditioning normaliser (fit it on training conditioning before training)."""
        return self.cond_embed.normalizer if self.cond_embed is not None else None

    def image_shape(
        self, weight_shape: tuple[int, int], pad_to: int | tuple[int, int] | None = None
    ) -> tuple[int, int]:
        """The padded (H, W) this model takes for a weight of ``weight_shape``."""
        return padded_shape(weight_shape, self.config.num_downsamplings, pad_to, patch=self.config.patch)

    def axis_maps(self, x: Tensor, emb: Tensor, cond: Cond | None) -> list[Tensor]:
        """Conditioning laid out along the matrix's rows and columns (empty unless configured).

        A Linear layer's per-sample gradient is an outer product of a row vector (the gradient at
        the layer's output) and a column vector (its input), so features indexed by row and by
        column let the convolutions place the conditioning where it acts.
        """
        c, (b, _, h, w) = self.config, x.shape
        maps: list[Tensor] = []
        if c.axis_channels:
            if (h, w) != tuple(c.axis_size):
                raise ValueError(f"input {(h, w)} differs from the axis_size {tuple(c.axis_size)} of this model")
            k = c.axis_channels
            maps.append(self.row_features(emb).view(b, k, h, 1).expand(b, k, h, w))
            maps.append(self.col_features(emb).view(b, k, 1, w).expand(b, k, h, w))
        if c.axis_signals:
            normed = self.normalizer(cond) if self.normalizer is not None else cond
            rows, cols = (normed[name] for name in c.axis_signals)
            rows = F.pad(rows, (0, h - rows.shape[1]))[:, None, :, None].expand(b, 1, h, w)
            cols = F.pad(cols, (0, w - cols.shape[1]))[:, None, None, :].expand(b, 1, h, w)
            maps += [rows.to(x.dtype), cols.to(x.dtype)]
        return maps

    def embed(self, t: Tensor, cond: Cond | None) -> Tensor:
        """Timestep embedding plus conditioning embedding, (B, temb_dim)."""
        emb = self.time_embed(timestep_embedding(t, self.config.channels))
        if self.cond_embed is not None:
            emb = emb + self.cond_embed(cond or {})
        elif cond:
            raise KeyError(f"unconditional model got conditioning signals {sorted(cond)}")
        return emb

    def forward(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        m = self.config.patch * 2**self.config.num_downsamplings
        if x.shape[-2] % m or x.shape[-1] % m:
            raise ValueError(f"input {tuple(x.shape[-2:])} must be divisible by {m}; pad with to_image()")
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        emb = self.embed(t, cond)
        if self.config.coord_channels:
            x = torch.cat([x, coordinate_grid(x)], dim=1)
        x = torch.cat([x, *self.axis_maps(x, emb, cond)], dim=1)
        h = self.conv_in(x)
        hs = [h]
        for stage in self.down:
            for block, attn in zip(stage.blocks, stage.attns, strict=True):
                h = attn(block(h, emb))
                hs.append(h)
            if not isinstance(stage.resample, nn.Identity):
                h = stage.resample(h)
                hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for stage in self.up:
            for block, attn in zip(stage.blocks, stage.attns, strict=True):
                h = attn(block(torch.cat([h, hs.pop()], dim=1), emb))
            h = stage.resample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
