"""An exponential moving average of a model's weights, kept in a separate eval-mode copy."""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class EMA:
    """``shadow = decay * shadow + (1 - decay) * param`` after each optimiser step.

    ``module`` is a frozen deep copy in eval mode (dropout off): sample with it, not the trained model.
    Buffers (e.g. the conditioning normaliser's statistics) are copied as they are.
    With ``warmup`` the effective decay is ``min(decay, (1 + n) / (10 + n))`` after n updates, so that
    short runs are not dominated by the initial weights.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must lie in [0, 1], got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights; copy its buffers."""
        decay = self.current_decay()
        for avg, p in zip(self.module.parameters(), model.parameters(), strict=True):
            avg.lerp_(p.detach().to(avg.dtype), 1.0 - decay)
        for avg, b in zip(self.module.buffers(), model.buffers(), strict=True):
            avg.copy_(b)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model``."""
        model.load_state_dict(self.module.state_dict())

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state["num_updates"])
        self.decay = float(state.get("decay", self.decay))
