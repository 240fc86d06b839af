"""A sweep's search space: Hydra's override grammar to Optuna's distributions (Optuna >= 3).

The grammar of hydra-optuna-sweeper's ``params`` (and of sweep overrides on the command line),
kept so that configs written for it work unchanged:

=====================================  ===================================================
``x=choice(a, b, 3)``                  ``CategoricalDistribution([a, b, 3])``
``x=range(1, 9, step=2)``              ``IntDistribution(1, 9, step=2)`` (floats: ``FloatDistribution``)
``x=shuffle(range(1, 4))``             ``CategoricalDistribution`` of the values
``x=interval(0.0, 1.0)``               ``FloatDistribution(0.0, 1.0)`` (Hydra reads an interval as floats)
``x=tag(log, interval(1e-4, 1e-1))``   the same with ``log=True``
``x=3``                                a fixed value, set in every trial
``~x``                                 a deletion, passed to every trial
=====================================  ===================================================

Written here rather than imported: hydra-optuna-sweeper's parser is private (``_impl``) and its
releases pin ``optuna<3``. A trial's value is drawn with Optuna's public ``suggest_*`` calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    RangeSweep,
    Transformer,
)
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

__all__ = ["SearchSpace", "distribution_of", "parse_search_space", "suggest"]

_CHOICE_TYPES = (str, int, float, bool, type(None))


@dataclass
class SearchSpace:
    """What a sweep's overrides say: the searched parameters, the fixed ones and deletions."""

    distributions: dict[str, BaseDistribution] = field(default_factory=dict)
    fixed: dict[str, str] = field(default_factory=dict)
    deletions: list[str] = field(default_factory=list)

    def overrides(self, values: dict[str, Any]) -> list[str]:
        """The overrides of one trial: its drawn ``values``, the fixed ones, the deletions."""
        drawn = [f"{name}={value}" for name, value in values.items()]
        return [*drawn, *(f"{k}={v}" for k, v in self.fixed.items()), *self.deletions]


def _choices(override: Override) -> list[Any]:
    values = list(override.sweep_iterator(transformer=Transformer.encode))
    for value in values:
        if not isinstance(value, _CHOICE_TYPES):
            raise ValueError(
                f"{override.get_key_element()}: a choice is a str, int, float, bool or null, got "
                f"{value!r} ({type(value).__name__})"
            )
    return values


def distribution_of(override: Override) -> BaseDistribution | str:
    """The distribution of a sweep override, or the value (as text) of a fixed one."""
    if not override.is_sweep_override():
        return override.get_value_element_as_str()
    value = override.value()
    if isinstance(value, ChoiceSweep):
        return CategoricalDistribution(_choices(override))
    if isinstance(value, RangeSweep):
        if value.shuffle:
            return CategoricalDistribution(_choices(override))
        numbers = (value.start, value.stop, value.step)
        if any(isinstance(n, float) for n in numbers):
            step = float(value.step) if value.step else None
            return FloatDistribution(float(value.start), float(value.stop), step=step)
        return IntDistribution(int(value.start), int(value.stop), step=int(value.step or 1))
    if isinstance(value, IntervalSweep):  # Hydra's grammar makes both ends floats
        log = "log" in value.tags
        return FloatDistribution(float(value.start), float(value.end), log=log)
    raise ValueError(
        f"{override.input_line!r} is not allowed in a sweep: use choice(...), range(...), "
        "interval(...) or tag(log, interval(...))"
    )


def parse_search_space(arguments: list[str]) -> SearchSpace:
    """The :class:`SearchSpace` of override strings (``params`` entries and sweep arguments, a
    later one winning for the same key)."""
    space = SearchSpace()
    for override in OverridesParser.create().parse_overrides(arguments):
        if override.is_delete():
            space.deletions.append(str(override.input_line))
            continue
        name = override.get_key_element()
        parsed = distribution_of(override)
        space.distributions.pop(name, None)
        space.fixed.pop(name, None)
        if isinstance(parsed, BaseDistribution):
            space.distributions[name] = parsed
        else:
            space.fixed[name] = parsed
    return space


def suggest(trial: optuna.Trial, name: str, distribution: BaseDistribution) -> Any:
    """A value of ``distribution`` for ``trial`` through Optuna's public ``suggest_*`` calls."""
    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(
            name, distribution.low, distribution.high, step=distribution.step, log=distribution.log
        )
    if isinstance(distribution, FloatDistribution):
        return trial.suggest_float(
            name, distribution.low, distribution.high, step=distribution.step, log=distribution.log
        )
    raise TypeError(f"{name}: no suggest call for {type(distribution).__name__}")
