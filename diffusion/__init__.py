"""Conditional DDPM over weight deltas: noise schedule, DDIM sampler, U-Net denoiser, scale model, EMA.

Pure torch. Typical use::

    schedule, sampler = create_diffusion()                      # T=1000, linear betas
    unet = create_denoiser("quick", {"act_in": 120, "act_out": 84, "output": 10})
    unet.normalizer.fit(train_cond)                             # conditioning statistics
    size = unet.image_shape((84, 120))                          # padded canvas
    loss = denoising_loss(lambda x, t: unet(x, t, cond), schedule, to_image(delta / rho, size))
    ...
    omega = sampler.sample(lambda x, t: ema.module(x, t, cond), noise, num_steps=10)
    delta_hat = rho_hat[:, None, None] * from_image(omega, (84, 120))
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import NamedTuple

from .conditioning import ConditionEmbedding, ConditionNormalizer
from .ddim import DDIMSampler, ddim_timesteps
from .ema import EMA
from .scale_model import ScaleModel, log_scale_loss, scale_loss
from .schedule import NoiseSchedule, ScheduleConfig, denoising_loss
from .unet import UNet, UNetConfig, count_parameters, from_image, padded_shape, to_image

# CPU-sized: a 4x4 patchify stem (the U-Net runs at 1/4 resolution, ~15x fewer FLOPs than a
# full-resolution 32-channel U-Net), then two downsamplings (96x128 -> 24x32 -> 12x16 -> 6x8),
# attention at the lowest level.
_QUICK = UNetConfig(
    channels=32,
    channel_mult=(1, 2, 2),
    num_res_blocks=1,
    attention_levels=(2,),
    dropout=0.1,
    norm_groups=8,
    patch=4,
)

#: Denoiser profiles (read-only). ``cond_dims`` is filled in by :func:`create_denoiser`.
PROFILES: Mapping[str, UNetConfig] = MappingProxyType(
    {
        # Paper / public OCD MNIST config: 128 channels, five downsamplings (128x128 canvas -> 4x4),
        # two residual blocks per level, attention at 16x16 (level 3 of a 128 canvas) and the bottleneck.
        "paper": UNetConfig(
            channels=128,
            channel_mult=(1, 1, 2, 2, 4, 4),
            num_res_blocks=2,
            attention_levels=(3,),
            dropout=0.4,
        ),
        "quick": _QUICK,
        # quick + conditioning laid out along the delta's rows and columns (act_out per row, act_in per
        # column, and 4 learned per-row/per-column feature maps): the denoiser can place the outer-product
        # structure of a Linear layer's delta. Not in the paper; see docs/results.md.
        "quick-axis": dataclasses.replace(_QUICK, axis_channels=4, axis_signals=("act_out", "act_in")),
        # For tests and toy problems: one downsampling, ~0.2M parameters.
        "tiny": UNetConfig(
            channels=16,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_levels=(1,),
            dropout=0.0,
            norm_groups=4,
        ),
    }
)


class Diffusion(NamedTuple):
    """The forward process and its sampler."""

    schedule: NoiseSchedule
    sampler: DDIMSampler


def create_diffusion(
    num_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 1e-2,
    clip_x0: float | None = None,
) -> Diffusion:
    """A linear-beta :class:`NoiseSchedule` and a :class:`DDIMSampler` over it."""
    schedule = NoiseSchedule(ScheduleConfig(num_timesteps, beta_start, beta_end))
    return Diffusion(schedule, DDIMSampler(schedule, clip_x0=clip_x0))


def create_denoiser(
    profile: str | UNetConfig = "quick", cond_dims: Mapping[str, int] | None = None, **overrides
) -> UNet:
    """A :class:`UNet` from a profile name (or config), conditioning widths and field overrides."""
    if isinstance(profile, str):
        if profile not in PROFILES:
            raise KeyError(f"unknown denoiser profile {profile!r}; known: {sorted(PROFILES)}")
        profile = PROFILES[profile]
    if cond_dims is not None:
        overrides["cond_dims"] = dict(cond_dims)
    config = dataclasses.replace(profile, **overrides)
    if config.axis_signals and not set(config.axis_signals) <= set(config.cond_dims):
        config = dataclasses.replace(config, axis_signals=())  # the task's signals are named differently
    return UNet(config)


__all__ = [
    "PROFILES",
    "ConditionEmbedding",
    "ConditionNormalizer",
    "DDIMSampler",
    "Diffusion",
    "EMA",
    "NoiseSchedule",
    "ScaleModel",
    "ScheduleConfig",
    "UNet",
    "UNetConfig",
    "count_parameters",
    "create_denoiser",
    "create_diffusion",
    "ddim_timesteps",
    "denoising_loss",
    "from_image",
    "log_scale_loss",
    "padded_shape",
    "scale_loss",
    "to_image",
]
