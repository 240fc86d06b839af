"""The checks of settings that enter by a config or a constructor: one place, one message form.

Every check raises one ``ValueError`` that names the setting, its value and what is allowed
(``RegSL threshold=1.5 is not allowed: it must be a number in (0, 1)``), where the value enters.
``bool`` is never taken for a number (``True`` is an ``int`` to Python, not to a user). Hydra and
``dataclasses`` check types, not ranges, so these few lines are written here once.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

__all__ = ["choice", "flag", "integer", "number"]


def _shown(value: Any) -> Any:
    """A config node as the plain value a user wrote (``[1, 2]``, not ``ListConfig``)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf comes with hydra-core
        return value
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value)
    return value


def _bounds(
    above: float | None, at_least: float | None, below: float | None, at_most: float | None
) -> str:
    lower = (f"({above}", f"> {above}") if above is not None else None
    lower = lower or ((f"[{at_least}", f">= {at_least}") if at_least is not None else None)
    upper = (f"{below})", f"< {below}") if below is not None else None
    upper = upper or ((f"{at_most}]", f"<= {at_most}") if at_most is not None else None)
    if lower and upper:
        return f" in {lower[0]}, {upper[0]}"
    if lower or upper:
        return f" {(lower or upper)[1]}"
    return ""


def number(
    name: str,
    value: Any,
    *,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
    at_most: float | None = None,
    what: str = "it",
) -> float:
    """``value`` as a float: a finite number, ``> above``, ``>= at_least``, ``< below`` and
    ``<= at_most`` (those given); else ``"<name>=<value> is not allowed: <what> must be ..."``."""
    ok = (
        not isinstance(value, bool)
        and isinstance(value, numbers.Real)  # int, float and numpy's scalars
        and math.isfinite(value)
    )
    if ok:
        ok = (
            (above is None or value > above)
            and (at_least is None or value >= at_least)
            and (below is None or value < below)
            and (at_most is None or value <= at_most)
        )
    if not ok:
        allowed = "a finite number" + _bounds(above, at_least, below, at_most)
        raise ValueError(f"{name}={_shown(value)!r} is not allowed: {what} must be {allowed}")
    return float(value)


def integer(
    name: str,
    value: Any,
    low: int | None = None,
    high: int | None = None,
    null: bool = False,
    also: str = "",
) -> int | None:
    """``value`` as an int in [low, high] (or ``None`` when ``null``); ``also`` names what else is
    allowed (``"null for all of them"``). numpy's integers count, ``True`` does not."""
    if value is None and null:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or (low is not None and value < low)
        or (high is not None and value > high)
    ):
        allowed = "an integer" + _bounds(None, low, None, high)
        if also:
            allowed += f", or {also}"
        raise ValueError(f"{name}={_shown(value)!r} is not allowed: it must be {allowed}")
    return int(value)


def choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices``."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(
            f"{name}={_shown(value)!r} is not allowed: choose one of {', '.join(choices)}"
        )
    return value


def flag(name: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False`` (not 0, 1 or ``"yes"``)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}={_shown(value)!r} is not allowed: it must be true or false")
    return value
