"""Per-sample losses and split-level metrics shared by tasks."""
from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def cross_entropy(output: Tensor, label: Tensor) -> Tensor:
    """Per-sample cross-entropy of logits."""
    return F.cross_entropy(output, label, reduction="none")


def squared_error(output: Tensor, label: Tensor) -> Tensor:
    """Per-sample mean squared error over all non-batch dimensions."""
    diff = (output - label.reshape(output.shape)) ** 2
    return diff.reshape(diff.shape[0], -1).mean(dim=1)


def expected_calibration_error(probs: Tensor, label: Tensor, bins: int = 15) -> float:
    """ECE with equal-width confidence bins."""
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == label).float()
    edges = torch.linspace(0, 1, bins + 1, dtype=probs.dtype)
    ece = torch.zeros((), dtype=torch.float64)
    for lo, hi in zip(edges[:-1], edges[1:], strict=False):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            gap = (confidence[in_bin].mean() - correct[in_bin].mean()).abs()
            ece += in_bin.float().mean().double() * gap.double()
    return float(ece)


def classification_metrics(outputs: Tensor, labels: Tensor) -> dict[str, float]:
    """Loss (mean cross-entropy), accuracy, NLL and ECE of logits."""
    log_probs = F.log_softmax(outputs.double(), dim=1)
    nll = float(F.nll_loss(log_probs, labels, reduction="mean"))
    return {
        "loss": nll,
        "accuracy": float((outputs.argmax(dim=1) == labels).double().mean()),
        "nll": nll,
        "ece": expected_calibration_error(log_probs.exp(), labels),
    }


def regression_metrics(outputs: Tensor, labels: Tensor) -> dict[str, float]:
    """Loss (MSE) and RMSE."""
    mse = float(squared_error(outputs.double(), labels.double()).mean())
    return {"loss": mse, "mse": mse, "rmse": mse**0.5}


def log_mean_softmax(outputs: Tensor) -> Tensor:
    """Ensemble of logits (K, B, C): the log of the averaged probabilities."""
    return torch.logsumexp(F.log_softmax(outputs, dim=-1), dim=0) - torch.log(
        torch.tensor(float(outputs.shape[0]), dtype=outputs.dtype)
    )


CLASSIFICATION_DIRECTIONS = {"loss": True, "accuracy": False, "nll": True, "ece": True}
REGRESSION_DIRECTIONS = {"loss": True, "mse": True, "rmse": True}
