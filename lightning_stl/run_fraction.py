"""A shorter run with the same relative schedule: the low fidelities of a multi-fidelity search.

Smooth Transfer's ω = {t0, τ, α} is relative to the run length T (``relative: true``), the
learning-rate schedule is a fraction of T (warm-up, cosine, milestones) and so is the validation
rhythm. ``run_fraction=f`` therefore trains a stage for about f·T steps and validates it as often
as the full run, at the same relative times t/T; nothing else changes (data, batch, seed, ω). A
successive-halving search ranks many ω on such short runs and trains only the best at full T
(``hparams_search=smooth_asha``; ``experiments/fidelity_ranking.py`` measures how well short runs
rank ω).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lightning_stl.checks import number

__all__ = ["ShortenedStage", "check_run_fraction", "shorten"]


def check_run_fraction(value: object) -> float:
    """``run_fraction`` must be a number in (0, 1] (1: the full run)."""
    return number(
        "run_fraction", value, above=0, at_most=1, what="it (the fraction of each stage's length)"
    )


@dataclass(frozen=True)
class ShortenedStage:
    """The optimiser steps of a shortened stage and how often it validates (in steps)."""

    max_steps: int
    val_check_interval: int | None


def shorten(total_steps: int, val_interval: int | None, fraction: float) -> ShortenedStage:
    """The stage of ``total_steps`` optimiser steps T, validated every ``val_interval`` steps v
    (``None``: it does not validate), at ``fraction`` f of its length.

    The validations keep their number ``n = round(T / v)`` and so their relative times k/n: the
    interval becomes ``v' = round(f·T / n)`` (half up) and the stage ``n·v'`` steps, so the last
    validation falls on the last step as it does at full length. Where f·T/n is under one step
    (an epoch of one batch), the stage is ``round(f·T)`` steps validated after every step.
    """
    if val_interval is None:
        return ShortenedStage(max(1, _half_up(fraction * total_steps)), None)
    validations = max(1, _half_up(total_steps / val_interval))
    per_validation = fraction * total_steps / validations
    if per_validation < 1:
        return ShortenedStage(max(1, _half_up(fraction * total_steps)), 1)
    interval = _half_up(per_validation)
    return ShortenedStage(interval * validations, interval)


def _half_up(value: float) -> int:
    """``value`` rounded half up (Python's ``round`` rounds half to even: 2.5 -> 2)."""
    return math.floor(value + 0.5)
