"""The rungs of a multi-fidelity sweep: each trial's ω trained at growing run lengths.

A trial of a sweep with ``hydra.sweeper.fidelity`` is a ladder of runs of one ω, at the run
lengths ``rungs`` (fractions of T, the last one 1.0: see :mod:`lightning_stl.run_fraction`). After
each rung the sweeper reports the run's objective to Optuna as the intermediate value at step
``resource = fraction / rungs[0]`` (1, 2, 4, 8 for 1/8, 1/4, 1/2, 1) and asks the study's pruner
(``hydra.sweeper.pruner``: Optuna's ``SuccessiveHalvingPruner`` or ``HyperbandPruner``, whose
rungs sit at ``min_resource · η^k``) whether the trial climbs on. Only the full-length rung
completes a trial with a value, so the study's best trial is always a full-length result; a trial
stopped lower is PRUNED, its last value kept for TPE (Optuna's TPE ranks pruned trials below
complete ones, by the step they reached and then their value).

The pruner's own decision is used, in Optuna's asynchronous form (ASHA, Li et al. 2020): a trial
climbs if its value is in the best 1/η of the values its rung has seen so far, itself included.
The runs of a batch finish together and are decided in the order they were asked, as if they had
finished in that order; so, as in ASHA, the first trials to reach a rung climb more easily than
later ones (the first always does), which costs a few extra runs early and never loses a good ω
to a cut made on too few values.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import optuna

from lightning_stl.run_fraction import check_run_fraction

__all__ = ["Rungs", "climbing"]


@dataclass(frozen=True)
class Rungs:
    """The run lengths of a trial's ladder and the override that sets them."""

    key: str
    fractions: tuple[float, ...]

    @classmethod
    def from_config(cls, conf: Any) -> Rungs | None:
        """``hydra.sweeper.fidelity`` (``None``: one full run per trial)."""
        if conf is None:
            return None
        fractions = tuple(
            check_run_fraction(f) for f in (conf.get("rungs") or [])
        )  # each in (0, 1]
        if not fractions or list(fractions) != sorted(set(fractions)) or fractions[-1] != 1.0:
            raise ValueError(
                f"hydra.sweeper.fidelity.rungs={list(fractions)} is not allowed: it must be "
                "increasing fractions of the run length ending with 1.0, e.g. [0.125, 0.25, "
                "0.5, 1.0]"
            )
        resources = [round(f / fractions[0]) for f in fractions]
        if len(set(resources)) != len(resources):
            raise ValueError(
                f"hydra.sweeper.fidelity.rungs={list(fractions)} is not allowed: the pruner "
                f"counts a rung's length in whole units of the first rung, and these give "
                f"{resources}; space the rungs at least one first rung apart, e.g. [0.125, 0.25, "
                "0.5, 1.0]"
            )
        return cls(str(conf.get("key") or "run_fraction"), fractions)

    def __len__(self) -> int:
        return len(self.fractions)

    def override(self, rung: int) -> str:
        return f"{self.key}={self.fractions[rung]}"

    def resource(self, rung: int) -> int:
        """The pruner's step of ``rung``: its length in units of the shortest rung."""
        return round(self.fractions[rung] / self.fractions[0])

    def is_last(self, rung: int) -> bool:
        return rung == len(self.fractions) - 1


def climbing(reported: Sequence[optuna.Trial]) -> Iterator[tuple[optuna.Trial, bool]]:
    """Whether each of the trials that have just reported a rung's value climbs to the next rung:
    the study's pruner decides each, in the order given (see the module docstring). A generator,
    so that the caller records each verdict before the next is asked."""
    for trial in reported:
        yield trial, not trial.should_prune()
