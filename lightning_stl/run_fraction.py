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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lightning_stl.checks import number

__all__ = [
    "ShortenedStage",
    "check_run_fraction",
    "check_shortenable",
    "shorten",
    "shortened_trainer_arguments",
]


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

    The validations keep their number ``n = ⌊T / v⌋`` (the full run's) and about their relative
    times k/n: the interval becomes ``v' = round(f·T / n)`` (half up) and the stage ``n·v'``
    steps, so its last validation falls on its last step (as the full run's does when v divides
    T). Where f·T/n is under one step (an epoch of one batch), the stage is ``round(f·T)`` steps
    validated after every step.
    """
    if val_interval is None:
        return ShortenedStage(max(1, _half_up(fraction * total_steps)), None)
    validations = max(1, total_steps // val_interval)
    per_validation = fraction * total_steps / validations
    if per_validation < 1:
        return ShortenedStage(max(1, _half_up(fraction * total_steps)), 1)
    interval = _half_up(per_validation)
    return ShortenedStage(interval * validations, interval)


def _half_up(value: float) -> int:
    """``value`` rounded half up (Python's ``round`` rounds half to even: 2.5 -> 2)."""
    return math.floor(value + 0.5)


def check_shortenable(
    trainer: Mapping[str, Any], stage: str, validates: bool, batches: int
) -> None:
    """A stage of ``batches`` batches an epoch, under the Trainer settings ``trainer``, can be
    shortened on whole optimiser steps at the full run's relative validation times."""
    accumulate = int(trainer.get("accumulate_grad_batches") or 1)
    if batches % accumulate:
        # Lightning steps on an epoch's last, partial accumulation and counts an integer
        # val_check_interval in batches across epochs: v'·k batches would drift off the steps
        raise ValueError(
            f"run_fraction < 1 with trainer.accumulate_grad_batches={accumulate}: an epoch of "
            f"stage {stage!r} is {batches} batches, not a multiple of {accumulate}, so a "
            "shortened run could not validate on whole optimiser steps. Use an "
            "accumulate_grad_batches that divides the epoch, or run_fraction=1"
        )
    within = trainer.get("val_check_interval")
    if validates and not (within is None or within == 1.0 or isinstance(within, float)):
        raise ValueError(
            f"run_fraction < 1 with trainer.val_check_interval={within}: a shortened run "
            "validates at the full run's relative steps, which it counts from epochs "
            "(check_val_every_n_epoch, or a val_check_interval below 1.0). Leave "
            "trainer.val_check_interval unset, or run_fraction=1"
        )


def shortened_trainer_arguments(
    trainer: Mapping[str, Any],
    max_steps: int | None,
    epochs: int,
    batches: int,
    every: int | None,
    validates: bool,
    fraction: float,
) -> dict[str, Any]:
    """The Trainer arguments of a stage at ``run_fraction`` f < 1: about f·T optimiser steps,
    validated as many times as the full stage, at the same relative steps (:func:`shorten`).

    The stage has ``max_steps`` steps or ``epochs`` epochs of ``batches`` batches, and validates
    every ``every`` epochs (``None``: 1; ``False``: it does not validate). T and the interval
    are counted in optimiser steps (``max_steps`` is), so under
    ``trainer.accumulate_grad_batches=k`` an epoch is b/k steps and the shortened interval of v'
    steps is v'·k batches (Lightning's integer ``val_check_interval`` counts batches).
    """
    accumulate = int(trainer.get("accumulate_grad_batches") or 1)
    per_epoch = batches // accumulate  # optimiser steps (check_shortenable: k divides b)
    total = max_steps or epochs * per_epoch
    interval = None
    if validates:
        within = trainer.get("val_check_interval")
        if isinstance(within, float) and within < 1 and every in (None, 1):  # of an epoch
            interval = max(1, round(within * per_epoch))
        else:
            interval = per_epoch * int(every or 1)
    short = shorten(total, interval, fraction)
    arguments: dict[str, Any] = {"max_epochs": -1, "max_steps": short.max_steps}
    if short.val_check_interval is not None:
        # validate every v' optimiser steps across epochs (Lightning: an int interval with
        # check_val_every_n_epoch=None), not at epoch ends
        arguments.update(
            val_check_interval=short.val_check_interval * accumulate, check_val_every_n_epoch=None
        )
    return arguments
