"""The target-loss weight λ(t) of Smooth Transfer Learning, and the callback that applies it.

Eq. 3 of Smooth Transfer Learning (Takayama, Sato et al.) weighs the mean cross-entropy of a
target sub-batch by λ and that of a source sub-batch by 1 − λ. Eq. 4 makes the weight a function
of the optimiser step t (1 ≤ t ≤ T):

    λ_ω(t) = [1 + exp(−(t − T/2 − t0)/τ + α)]^−1,      ω = {t0, τ, α}.

τ → 0 gives the step function of Eq. 5 (pre-train, then fine-tune at t = T/2 + t0); τ → ∞ gives the
constant (1 + e^α)^−1 of Eq. 6 (multi-task learning with a fixed weight).

The weight is called ``target_weight`` throughout this package (``lambda`` is a Python keyword).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import lightning as L
import numpy as np

from lightning_stl.checks import flag, number
from lightning_stl.loggers import logs_this_step

#: The domains a training step may draw a sub-batch from.
TARGET, SOURCE = "target", "source"


def _sigmoid(z: float) -> float:
    """1 / (1 + exp(−z)) for any z in [−inf, inf], without overflow.

    Evaluated literally as 1 / (1 + exp(−z)) (so τ = inf gives Eq. 6's (1 + e^α)^−1 to the last
    bit) except where exp(−z) would overflow, where 1/(1 + e^−z) = e^z to double precision.
    """
    if z < -700.0:
        return math.exp(z)
    return 1.0 / (1.0 + math.exp(-z))


def _check_tau(tau: float) -> float:
    tau = float(tau)
    if math.isnan(tau) or tau <= 0:
        raise ValueError(
            f"tau={tau} is not allowed: the gain τ of Eq. 4 must be > 0 "
            "(a tiny τ gives the step of Eq. 5, a huge or infinite τ the constant of Eq. 6)"
        )
    return tau


def sigmoid_target_weight(
    t: float, total_steps: float, t0: float, tau: float, alpha: float
) -> float:
    """λ_ω(t) of Eq. 4, in absolute units (t, T, t0 and τ in optimiser steps).

    Numerically stable for every finite t0, α and every τ in (0, inf]: τ → 0 gives exactly 0 or 1
    away from t = T/2 + t0 (Eq. 5) and τ = inf gives exactly (1 + e^α)^−1 (Eq. 6). No overflow
    warning is ever raised.
    """
    z = (t - total_steps / 2 - t0) / tau - alpha
    return _sigmoid(z)


class TargetWeightSchedule(ABC):
    """λ(t): the weight of the target loss at optimiser step t of T (Eq. 3)."""

    @abstractmethod
    def __call__(self, step: int, total_steps: int) -> float:
        """The target weight at ``step`` (1-based) of ``total_steps``."""

    def domains(self) -> tuple[str, ...]:
        """The domains whose sub-batches this schedule ever weighs above zero."""
        return (TARGET, SOURCE)

    def curve(self, total_steps: int) -> np.ndarray:
        """λ(t) for t = 1..T as an array ``[T]``."""
        return np.array([self(t, total_steps) for t in range(1, total_steps + 1)])

    def describe(self) -> dict[str, Any]:
        """The schedule's parameters, for result files."""
        return {"schedule": type(self).__name__}


class SigmoidTargetWeight(TargetWeightSchedule):
    """Eq. 4: λ_ω(t) = [1 + exp(−(t − T/2 − t0)/τ + α)]^−1.

    With ``relative=True`` (the default) ``t0`` and ``tau`` are fractions of the total number of
    steps T (t0 = 0.1 means T/2 + 0.1·T), so that one search space fits every run length; they are
    turned into the paper's absolute ω before Eq. 4 is evaluated, so both forms give identical
    values. ``tau`` may be ``inf`` (Eq. 6 exactly).
    """

    def __init__(
        self, t0: float = 0.0, tau: float = 0.1, alpha: float = 0.0, relative: bool = True
    ):
        self.t0 = number("t0", t0)
        self.tau = _check_tau(tau)
        self.alpha = number("alpha", alpha)
        self.relative = flag("target weight relative", relative)

    def absolute(self, total_steps: int) -> tuple[float, float, float]:
        """ω = (t0, τ, α) in optimiser steps for a run of ``total_steps``."""
        if not self.relative:
            return self.t0, self.tau, self.alpha
        return self.t0 * total_steps, self.tau * total_steps, self.alpha

    def __call__(self, step: int, total_steps: int) -> float:
        t0, tau, alpha = self.absolute(total_steps)
        return sigmoid_target_weight(step, total_steps, t0, tau, alpha)

    def describe(self) -> dict[str, Any]:
        return {
            "schedule": "sigmoid",
            "t0": self.t0,
            "tau": self.tau,
            "alpha": self.alpha,
            "relative": self.relative,
        }

    def __repr__(self) -> str:
        return (
            f"SigmoidTargetWeight(t0={self.t0}, tau={self.tau}, alpha={self.alpha}, "
            f"relative={self.relative})"
        )


class ConstantTargetWeight(TargetWeightSchedule):
    """A fixed weight (Eq. 6): multi-task learning, or one domain alone at 0 (source) and 1 (target)."""

    def __init__(self, value: float):
        value = float(value)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"target weight value={value} is not allowed: it must lie in [0, 1]")
        self.value = value

    def __call__(self, step: int, total_steps: int) -> float:
        return self.value

    def domains(self) -> tuple[str, ...]:
        if self.value == 1.0:
            return (TARGET,)
        if self.value == 0.0:
            return (SOURCE,)
        return (TARGET, SOURCE)

    def describe(self) -> dict[str, Any]:
        return {"schedule": "constant", "value": self.value}

    def __repr__(self) -> str:
        return f"ConstantTargetWeight(value={self.value})"


class TargetWeightScheduler(L.Callback):
    """Sets ``pl_module.target_weight`` = λ(t) before every optimiser step, and logs it.

    t is the 1-based index of the optimiser step about to be taken (``trainer.global_step + 1``),
    T is ``trainer.estimated_stepping_batches`` (so it counts gradient accumulation and
    ``max_steps`` the way Lightning does). The applied values are kept in :attr:`history`, which
    is saved with checkpoints so that a resumed run writes the whole curve.
    """

    def __init__(self, schedule: TargetWeightSchedule):
        self.schedule = schedule
        self.history: dict[int, float] = {}
        self.total_steps: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total) or total <= 0:
            raise ValueError(
                f"the target-weight schedule needs a finite number of training steps, got {total}: "
                "set trainer.max_epochs or trainer.max_steps"
            )
        self.total_steps = int(total)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step + 1
        weight = self.schedule(step, self.total_steps)
        pl_module.target_weight = weight
        self.history[step] = weight
        if logs_this_step(trainer):
            pl_module.log("train/target_weight", weight, on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return {"history": dict(self.history), "total_steps": self.total_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = dict(state_dict.get("history", {}))
        self.total_steps = state_dict.get("total_steps")
