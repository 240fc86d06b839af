"""Figures of the target weight λ(t) (Smooth Transfer Learning, Fig. 1–2)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_target_weight(
    steps: Sequence[int],
    weights: Sequence[float],
    path: str | Path,
    best_step: int | None = None,
    title: str | None = None,
) -> Path:
    """λ(t) against the optimiser step, with the best-validation (early-stopped) step dashed."""
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot(steps, weights, color="tab:red", lw=1.8, label="λ(t)")
    if best_step is not None:
        ax.axvline(
            best_step,
            color="tab:blue",
            ls="--",
            lw=1.2,
            label=f"best validation (step {best_step})",
        )
    ax.set_xlabel("optimiser step t")
    ax.set_ylabel("target weight λ(t)")
    ax.set_ylim(-0.03, 1.03)
    if len(steps):
        ax.set_xlim(0, max(steps))
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    """Lay out, write and close ``fig`` (the last step of every run figure)."""
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
