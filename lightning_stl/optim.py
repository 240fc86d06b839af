"""Optimiser and learning-rate schedules of the two papers.

* ``schedule="warmup_cosine"`` (Smooth Transfer Learning, Appendix A.1–A.3): momentum SGD (0.9);
  the learning rate rises linearly over the first 2.5% of the steps, then follows cosine annealing
  from the peak to the final rate (0.1 → 1e-3 for CIFAR, 1e-2 → 1e-4 for SVHN).
* ``schedule="step"`` (SMILE, Section 4.0.2): the learning rate is divided by 10 after two-thirds
  of the iterations (``milestones=[0.6667]``, ``gamma=0.1``), after an optional linear warm-up.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    LinearLR,
    LRScheduler,
    MultiStepLR,
    SequentialLR,
)

from lightning_stl.checks import choice, flag, number


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


def warmup_step_lr(
    step: int,
    total_steps: int,
    peak_lr: float,
    warmup_fraction: float,
    milestones: tuple[float, ...],
    gamma: float,
) -> float:
    """The learning rate of the 0-based ``step``: linear warm-up (as :func:`warmup_cosine_lr`),
    then ``peak_lr · gamma^k`` where k counts the milestones ``m`` (fractions of ``total_steps``)
    with ``step >= round(m · total_steps)``."""
    warmup = warmup_steps(total_steps, warmup_fraction)
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    passed = sum(step >= round(m * total_steps) for m in milestones)
    return peak_lr * gamma**passed


SCHEDULES = ("warmup_cosine", "step")


@dataclass(frozen=True)
class SGDConfig:
    """Momentum SGD with a warm-up then cosine (Appendix A.3) or step (SMILE) schedule.

    ``final_lr`` is used by the cosine schedule, ``milestones`` (fractions of the steps) and
    ``gamma`` by the step schedule.
    """

    lr: float = 0.1
    final_lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.025
    nesterov: bool = False
    schedule: str = "warmup_cosine"
    milestones: tuple[float, ...] = (2 / 3,)
    gamma: float = 0.1

    def __post_init__(self) -> None:
        number("optimizer.lr", self.lr, above=0)
        number("optimizer.final_lr", self.final_lr)
        if not 0 <= self.final_lr <= self.lr:
            raise ValueError(
                f"optimizer.final_lr={self.final_lr} is not allowed: it must lie in [0, lr={self.lr}]"
            )
        number("optimizer.momentum", self.momentum, at_least=0, below=1)
        number("optimizer.weight_decay", self.weight_decay, at_least=0)
        number("optimizer.warmup_fraction", self.warmup_fraction, at_least=0, below=1)
        number("optimizer.gamma", self.gamma, above=0, at_most=1)
        flag("optimizer.nesterov", self.nesterov)
        choice("optimizer.schedule", self.schedule, SCHEDULES)
        if not isinstance(self.milestones, list | tuple):
            raise ValueError(
                f"optimizer.milestones={self.milestones!r} is not allowed: it must be a list of "
                "fractions of the steps in (0, 1), e.g. [0.6667]"
            )
        object.__setattr__(self, "milestones", tuple(self.milestones))
        if not all(isinstance(m, int | float) and 0 < m < 1 for m in self.milestones):
            raise ValueError(
                f"optimizer.milestones={list(self.milestones)} is not allowed: each must be a "
                "fraction of the steps in (0, 1)"
            )

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
        scheduler = self.scheduler(optimizer, int(total_steps))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int) -> LRScheduler:
        """torch's schedulers for :func:`warmup_cosine_lr` / :func:`warmup_step_lr`, stepped once
        per optimiser step: ``LinearLR`` from ``lr / W`` to ``lr`` over the W warm-up steps, then
        ``CosineAnnealingLR`` to ``final_lr`` at the last step, or ``MultiStepLR`` at the
        milestones, joined by ``SequentialLR``. (Their recursive updates agree with the closed
        forms to ~1e-14 relative, not bit for bit.)"""
        warmup = warmup_steps(total_steps, self.warmup_fraction)
        span = total_steps - warmup - 1  # cosine steps after the first post-warm-up one
        main: LRScheduler
        if self.schedule == "step":
            # a list, not a set: two milestones on one step (or inside the warm-up) both count
            milestones = sorted(max(0, round(m * total_steps) - warmup) for m in self.milestones)
            main = MultiStepLR(optimizer, milestones, gamma=self.gamma)
        elif span <= 0:  # no room for a cosine: the one step after the warm-up is the last
            main = MultiStepLR(optimizer, [0], gamma=self.final_lr / self.lr)
        else:
            main = CosineAnnealingLR(optimizer, T_max=span, eta_min=self.final_lr)
        if warmup == 0:
            return main
        ramp = LinearLR(optimizer, 1 / warmup, 1.0, total_iters=max(1, warmup - 1))
        return SequentialLR(optimizer, [ramp, main], milestones=[warmup])


def scheduler_state_from_lambda_lr(config: SGDConfig, state: dict[str, Any]) -> dict[str, Any]:
    """The state of ``config.scheduler`` at the step recorded by the ``LambdaLR`` state of a
    checkpoint written before the schedules were torch's (its factor object saved
    ``total_steps``), so that such a run resumes on the same learning rates."""
    total = int(state["lr_lambdas"][0]["total_steps"])
    groups = [
        {"params": [torch.zeros(1, requires_grad=True)], "lr": lr} for lr in state["base_lrs"]
    ]
    optimizer = torch.optim.SGD(groups, lr=config.lr)
    scheduler = config.scheduler(optimizer, total)
    with warnings.catch_warnings():  # stepped without optimiser steps, on purpose
        warnings.simplefilter("ignore")
        for _ in range(int(state["last_epoch"])):
            scheduler.step()
    return scheduler.state_dict()
