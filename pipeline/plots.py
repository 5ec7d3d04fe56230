"""PNG plots (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def plot_loss_curve(losses: list[list[float]], path: Path) -> None:
    """Diffusion loss and scale loss against the optimisation step (smoothed)."""
    rows = np.asarray(losses, dtype=float).reshape(-1, 4)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, column, title in ((axes[0], 2, "diffusion loss (MSE on noise)"), (axes[1], 3, "scale loss (dB)")):
        values = rows[:, column]
        ax.plot(rows[:, 0], values, alpha=0.3, lw=0.8)
        window = max(1, len(values) // 50)
        if len(values) >= window:
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            ax.plot(rows[window - 1 :, 0], smooth, lw=1.5)
        ax.set_title(title)
        ax.set_xlabel("step")
        if column == 2 and len(values) and (values > 0).all():
            ax.set_yscale("log")
    _save(fig, path)


def plot_ensemble_curve(sizes: list[int], values: dict[str, list[float]], base: dict[str, float], path: Path) -> None:
    """Each metric against the OCD ensemble size, with the base model as a line."""
    names = list(values)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        ax.plot(sizes, values[name], marker="o", label="OCD ensemble")
        ax.axhline(base[name], color="gray", ls="--", label="base")
        ax.set_xlabel("ensemble size K")
        ax.set_title(name)
    axes[0][0].legend()
    _save(fig, path)


def plot_loss_change(changes: dict[str, np.ndarray], path: Path) -> None:
    """Histogram of the per-sample loss change (method minus base) for each method."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    finite = np.concatenate([v[np.isfinite(v)] for v in changes.values()])
    lo, hi = np.quantile(finite, [0.01, 0.99]) if finite.size else (-1, 1)
    bins = np.linspace(lo, hi, 60)
    for name, v in changes.items():
        ax.hist(np.clip(v, lo, hi), bins=bins, histtype="step", lw=1.4, label=f"{name} (mean {v.mean():+.4f})")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("per-sample loss change vs base (negative = better)")
    ax.set_ylabel("test samples")
    ax.legend(fontsize=8)
    _save(fig, path)
