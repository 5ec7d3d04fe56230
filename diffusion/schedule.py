"""The forward (noising) process of a DDPM with linear betas, and its epsilon-prediction loss."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import functional as F

Tensor = torch.Tensor
DenoiseFn = Callable[[Tensor, Tensor], Tensor]  #: (x_t, t) -> predicted eps


@dataclass(frozen=True)
class ScheduleConfig:
    """A linear beta schedule (Ho et al. 2020)."""

    num_timesteps: int = 1000  #: T, the number of diffusion steps
    beta_start: float = 1e-4  #: beta_1 (paper: 1e-4; public OCD code: 1e-6)
    beta_end: float = 1e-2  #: beta_T (paper: 1e-2; DDPM: 2e-2)

    def __post_init__(self) -> None:
        if self.num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {self.num_timesteps}")
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}")


class NoiseSchedule:
    """Precomputed schedule tensors (float64, CPU) and the closed-form q(x_t | x_0).

    Timesteps are 0-based: ``t`` in ``[0, T)``; ``alphas_cumprod[t]`` is abar_{t+1} of the paper.
    Coefficients are gathered onto the device and dtype of the tensors they multiply.
    """

    def __init__(self, config: ScheduleConfig | None = None) -> None:
        self.config = config or ScheduleConfig()
        c = self.config
        self.betas = torch.linspace(c.beta_start, c.beta_end, c.num_timesteps, dtype=torch.float64)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self._abar_table = torch.cat([self.alphas_cumprod, torch.ones(1, dtype=torch.float64)])  # [-1] -> 1

    @property
    def num_timesteps(self) -> int:
        return self.config.num_timesteps

    def abar(self, t: Tensor | int, like: Tensor) -> Tensor:
        """abar_t for integer ``t`` (scalar or (B,)), shaped to broadcast against ``like`` (B, ...).

        ``t = -1`` means "before the first step" and gives abar = 1.
        """
        t = torch.as_tensor(t).cpu().long()
        if ((t < -1) | (t >= self.num_timesteps)).any():
            raise ValueError(f"timesteps must lie in [-1, {self.num_timesteps}), got {t.tolist()}")
        out = self._abar_table[t].to(device=like.device, dtype=like.dtype)
        return out.reshape(out.shape + (1,) * (like.dim() - out.dim()))

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, a draw from q(x_t | x_0)."""
        a = self.abar(t, x0)
        return a.sqrt() * x0 + (1.0 - a).sqrt() * noise

    def predict_x0(self, x_t: Tensor, eps: Tensor, t: Tensor | int) -> Tensor:
        """Invert :meth:`add_noise` given the noise: x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        a = self.abar(t, x_t)
        return (x_t - (1.0 - a).sqrt() * eps) / a.sqrt()

    def sample_timesteps(
        self, batch: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        """``batch`` uniform timesteps in ``[0, T)`` (long), drawn on the generator's device."""
        gen_device = generator.device if generator is not None else "cpu"
        t = torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=gen_device)
        return t.to(device) if device is not None else t


def denoising_loss(
    denoise_fn: DenoiseFn,
    schedule: NoiseSchedule,
    x0: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The simple DDPM objective: MSE between the true and predicted noise at a uniform random t.

    ``denoise_fn(x_t, t)`` is the conditioned model, e.g. ``lambda x, t: unet(x, t, cond)``.
    Noise and timesteps come from ``generator`` (on its device) and are moved to ``x0``'s device.
    """
    gen_device = generator.device if generator is not None else x0.device
    t = schedule.sample_timesteps(x0.shape[0], generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(x0.device)
    return F.mse_loss(denoise_fn(schedule.add_noise(x0, noise, t), t), noise)
