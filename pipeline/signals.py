"""From store records to the diffusion model's tensors: conditioning, delta matrices, scales."""
from __future__ import annotations

import torch

from ..tasks import Task

COND_FIELDS = ("act_in", "act_out", "output")
Tensor = torch.Tensor


def conditioning(task: Task, records: dict[str, Tensor]) -> dict[str, Tensor]:
    """The three label-free signals, each flattened to (B, dim) float32."""
    signals = {
        "act_in": records["act_in"],
        "act_out": records["act_out"],
        "output": task.encode_output(records["output"]),
    }
    return {name: value.flatten(1).float() for name, value in signals.items()}


def cond_dims(task: Task, records: dict[str, Tensor]) -> dict[str, int]:
    return {name: int(value.shape[1]) for name, value in conditioning(task, records).items()}


def delta_matrix(delta: Tensor) -> Tensor:
    """(B, out, ...) weight deltas as (B, out, K) matrices (Conv2d kernels flattened)."""
    return delta.flatten(2).float()


def delta_scale(matrix: Tensor) -> Tensor:
    """Per-sample scale rho: the element-wise std of each delta (floored to stay positive)."""
    return matrix.flatten(1).std(dim=1).clamp_min(1e-12)
