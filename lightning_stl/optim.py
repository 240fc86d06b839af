"""Optimiser and learning-rate schedule of Smooth Transfer Learning, Appendix A.1–A.3.

Momentum SGD (0.9); the learning rate rises linearly over the first 2.5% of the steps, then follows
cosine annealing from the peak to the final rate (0.1 → 1e-3 for CIFAR, 1e-2 → 1e-4 for SVHN).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn


def warmup_cosine_lr(
    step: int, total_steps: int, peak_lr: float, final_lr: float, warmup_fraction: float
) -> float:
    """The learning rate of the 0-based optimiser ``step`` out of ``total_steps``.

    Warm-up: ``peak_lr · (step + 1) / W`` for the first W = round(warmup_fraction · T) steps (at
    least one step when warmup_fraction > 0), so the W-th step reaches the peak. Then cosine
    annealing over the remaining steps: ``final + (peak − final) · (1 + cos(π p)) / 2`` with p going
    from 0 at the first post-warm-up step to 1 at the last step, which therefore uses ``final_lr``.
    """
    warmup = warmup_steps(total_steps, warmup_fraction)
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    span = total_steps - warmup - 1
    progress = 1.0 if span <= 0 else min(1.0, (step - warmup) / span)
    return final_lr + (peak_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps(total_steps: int, warmup_fraction: float) -> int:
    """Number of warm-up steps W for a run of ``total_steps``."""
    if warmup_fraction <= 0:
        return 0
    return max(1, round(warmup_fraction * total_steps))


class WarmupCosineFactor:
    """``LambdaLR`` factor for :func:`warmup_cosine_lr` (a class so that it pickles)."""

    def __init__(self, total_steps: int, peak_lr: float, final_lr: float, warmup_fraction: float):
        self.total_steps = int(total_steps)
        self.peak_lr = float(peak_lr)
        self.final_lr = float(final_lr)
        self.warmup_fraction = float(warmup_fraction)

    def __call__(self, step: int) -> float:
        lr = warmup_cosine_lr(
            step, self.total_steps, self.peak_lr, self.final_lr, self.warmup_fraction
        )
        return lr / self.peak_lr


@dataclass(frozen=True)
class SGDConfig:
    """Momentum SGD with linear warm-up then cosine annealing (Appendix A.3)."""

    lr: float = 0.1
    final_lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.025
    nesterov: bool = False

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"optimizer.lr={self.lr} is not allowed: it must be > 0")
        if not 0 <= self.final_lr <= self.lr:
            raise ValueError(
                f"optimizer.final_lr={self.final_lr} is not allowed: it must lie in [0, lr={self.lr}]"
            )
        if not 0 <= self.momentum < 1:
            raise ValueError(
                f"optimizer.momentum={self.momentum} is not allowed: it must lie in [0, 1)"
            )
        if self.weight_decay < 0:
            raise ValueError(
                f"optimizer.weight_decay={self.weight_decay} is not allowed: it must be >= 0"
            )
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(
                f"optimizer.warmup_fraction={self.warmup_fraction} is not allowed: it must lie in [0, 1)"
            )

    def as_dict(self) -> dict[str, float | bool]:
        return asdict(self)

    def build(self, parameters: list[nn.Parameter] | nn.Module, total_steps: int) -> dict:
        """Optimiser and per-step scheduler in the form ``configure_optimizers`` returns."""
        params = parameters.parameters() if isinstance(parameters, nn.Module) else parameters
        optimizer = torch.optim.SGD(
            params,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            nesterov=self.nesterov,
        )
        factor = WarmupCosineFactor(total_steps, self.lr, self.final_lr, self.warmup_fraction)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }
