"""The objects of a config group, built the lightning-hydra-template way.

The template's ``instantiate_callbacks`` / ``instantiate_loggers`` (``src/utils/instantiators.py``):
every entry of a group (``callbacks``, ``logger``, ``method.callbacks``) that is a config with a
``_target_`` becomes one object, in the group's order, so that a user adds a callback or a logger
by config alone (``+callbacks.my_callback._target_=...``). An entry set to ``null`` is switched
off; anything else is refused with its key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import hydra

__all__ = ["instantiate_group"]


def instantiate_group(group: Mapping[str, Any] | None, name: str, **overrides: Any) -> list[Any]:
    """``hydra.utils.instantiate`` of every entry of config group ``name`` (``overrides`` go to
    each); ``None`` entries are left out."""
    objects = []
    for key, conf in (group or {}).items():
        if conf is None:
            continue
        if not isinstance(conf, Mapping) or "_target_" not in conf:
            raise ValueError(
                f"{name}.{key}={conf!r} is not allowed: an entry of {name} is a config with a "
                f"_target_ (the class to build), or null to switch it off"
            )
        objects.append(hydra.utils.instantiate(conf, **overrides))
    return objects
