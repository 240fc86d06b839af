"""Named layers of a backbone: the stage outputs (``feature_info``) or modules named by the user.

DELTA (and anything else that reads feature maps) names its layers as ``named_modules()`` keys;
a wrong name gets the list of the modules that are there.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

_MAX_NAMES_SHOWN = 40


def default_layers(backbone: nn.Module, owner: str = "DELTA") -> list[str]:
    """The modules of ``backbone.feature_info`` (timm's list of ``{"module": name, ...}``, or a
    ``FeatureInfo``): the stage outputs."""
    info = getattr(backbone, "feature_info", None)
    if info is None:
        raise ValueError(
            f"{owner} layers=null takes the modules of backbone.feature_info, but "
            f"{type(backbone).__name__} has none: name the layers, e.g. "
            f"layers=[{', '.join(_children(backbone, '')[:3])}]; {_listing(backbone, '')}"
        )
    if hasattr(info, "module_name"):
        return list(info.module_name())
    return [entry["module"] for entry in info]


def resolve_layers(
    backbone: nn.Module, layers: Sequence[str] | None, owner: str = "DELTA"
) -> list[str]:
    """``layers`` (or :func:`default_layers`) after checking that each names a sub-module;
    ``owner`` names who asks, in the messages."""
    names = default_layers(backbone, owner) if layers is None else list(layers)
    modules = dict(backbone.named_modules())
    for name in names:
        if not name or name not in modules:
            parent = _deepest_parent(modules, name)
            raise ValueError(
                f"{owner} layers: {name!r} is not a module of the backbone "
                f"{type(backbone).__name__}; {_listing(backbone, parent)}"
            )
    return names


def _deepest_parent(modules: dict[str, nn.Module], name: str) -> str:
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in modules:
            return prefix
    return ""


def _children(backbone: nn.Module, parent: str) -> list[str]:
    module = backbone.get_submodule(parent) if parent else backbone
    return [f"{parent}.{name}" if parent else name for name, _ in module.named_children()]


def _listing(backbone: nn.Module, parent: str) -> str:
    names = _children(backbone, parent)
    shown = ", ".join(names[:_MAX_NAMES_SHOWN])
    if len(names) > _MAX_NAMES_SHOWN:
        shown += f", ... ({len(names)} in all)"
    where = f"the modules in {parent!r} are" if parent else "its top-level modules are"
    return f"{where}: {shown} (nested modules as 'parent.child', e.g. 'layer1.0')"
