"""DDIM sampling (Song et al. 2021) over a strided subset of a :class:`NoiseSchedule`'s timesteps."""
from __future__ import annotations

import torch

from .schedule import DenoiseFn, NoiseSchedule

Tensor = torch.Tensor


def ddim_timesteps(num_timesteps: int, num_steps: int) -> Tensor:
    """``num_steps`` evenly spaced timesteps, descending, ending at 0 (T=1000, 10 -> 900, 800, ..., 0)."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must lie in [1, {num_timesteps}], got {num_steps}")
    return (torch.arange(num_steps, dtype=torch.long) * (num_timesteps // num_steps)).flip(0)


class DDIMSampler:
    """Deterministic (eta = 0) or stochastic DDIM updates with an epsilon-predicting model.

    ``clip_x0``: clamp the predicted x0 to ``[-clip_x0, clip_x0]`` before each update; ``None`` (default)
    leaves it unbounded, as OCD's normalised weight deltas have no fixed range.
    """

    def __init__(self, schedule: NoiseSchedule, clip_x0: float | None = None) -> None:
        self.schedule = schedule
        self.clip_x0 = clip_x0
        self.timesteps = ddim_timesteps(schedule.num_timesteps, schedule.num_timesteps)
        self.step_ratio = 1

    def set_timesteps(self, num_steps: int) -> Tensor:
        """Select ``num_steps`` evenly spaced timesteps (stored in ``self.timesteps``) and return them."""
        self.timesteps = ddim_timesteps(self.schedule.num_timesteps, num_steps)
        self.step_ratio = self.schedule.num_timesteps // num_steps
        return self.timesteps

    def step(
        self,
        eps: Tensor,
        t: Tensor | int,
        x_t: Tensor,
        eta: float = 0.0,
        noise: Tensor | None = None,
        t_prev: Tensor | int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """One update x_t -> x_{t_prev}; ``t_prev`` defaults to ``t - step_ratio`` (-1 means x0 itself).

        With ``eta > 0`` the update adds ``sigma_t * noise``; ``noise`` defaults to a draw from ``generator``.
        """
        if t_prev is None:
            t_prev = torch.as_tensor(t) - self.step_ratio
        t_prev = torch.as_tensor(t_prev).clamp(min=-1)
        a_t = self.schedule.abar(t, x_t)
        a_prev = self.schedule.abar(t_prev, x_t)
        x0 = (x_t - (1.0 - a_t).sqrt() * eps) / a_t.sqrt()
        if self.clip_x0 is not None:
            x0 = x0.clamp(-self.clip_x0, self.clip_x0)
        sigma = eta * ((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)).sqrt()
        x_prev = a_prev.sqrt() * x0 + (1.0 - a_prev - sigma**2).clamp(min=0.0).sqrt() * eps
        if eta > 0.0:
            if noise is None:
                gen_device = generator.device if generator is not None else x_t.device
                noise = torch.randn(x_t.shape, generator=generator, device=gen_device, dtype=x_t.dtype)
            x_prev = x_prev + sigma * noise.to(x_t.device)
        return x_prev

    @torch.no_grad()
    def sample(
        self,
        denoise_fn: DenoiseFn,
        noise: Tensor,
        num_steps: int,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Run ``num_steps`` DDIM updates from ``noise`` (= x_T) and return the final x0 estimate.

        ``denoise_fn(x_t, t)`` gets ``t`` as a (B,) long tensor on ``noise``'s device. At ``eta = 0`` the
        result is a deterministic function of ``noise``; ``generator`` only matters when ``eta > 0``.
        Does not change ``self.timesteps``.
        """
        timesteps = ddim_timesteps(self.schedule.num_timesteps, num_steps).tolist()
        x = noise
        for i, t in enumerate(timesteps):
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
            x = self.step(denoise_fn(x, t_batch), t, x, eta=eta, t_prev=t_prev, generator=generator)
        return x
