"""Bootstrap intervals for metrics and paired comparisons."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def bootstrap_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) indices drawn with replacement, reproducible for a seed."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def metric_intervals(
    metrics: Callable[[torch.Tensor, torch.Tensor], dict[str, float]],
    outputs: torch.Tensor,
    labels: torch.Tensor,
    indices: np.ndarray,
) -> dict[str, dict[str, float]]:
    """Each metric's value on the full set and its 95% percentile-bootstrap interval."""
    point = metrics(outputs, labels)
    draws: dict[str, list[float]] = {name: [] for name in point}
    for idx in indices:
        sample = torch.from_numpy(idx)
        for name, value in metrics(outputs[sample], labels[sample]).items():
            draws[name].append(value)
    return {
        name: {"mean": value, "ci_low": float(np.quantile(draws[name], 0.025)),
               "ci_high": float(np.quantile(draws[name], 0.975))}
        for name, value in point.items()
    }


def paired_difference(values: np.ndarray, reference: np.ndarray, indices: np.ndarray) -> dict[str, float]:
    """Mean per-sample difference (values - reference) with a 95% bootstrap interval."""
    diff = np.asarray(values, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    means = diff[indices].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return {
        "mean": float(diff.mean()),
        "ci_low": float(low),
        "ci_high": float(high),
        "excludes_zero": bool(low > 0 or high < 0),
        "fraction_better": float((diff < 0).mean()),
    }
