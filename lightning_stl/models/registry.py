"""One way to build every backbone: this project's models and timm's live in timm's registry.

This project's architectures (:mod:`~lightning_stl.models.resnet_cifar`,
:mod:`~lightning_stl.models.wide_resnet`, :mod:`~lightning_stl.models.digits_cnn`) register their
entry points with :func:`register_backbone`, a thin wrapper around
:func:`timm.models.register_model`. After ``import lightning_stl.models`` a name such as
``"resnet20"`` is therefore created exactly like a timm model::

    import timm
    import lightning_stl.models  # registers this project's backbones

    model = timm.create_model("resnet20", num_classes=10)  # logits [B, 10]
    backbone = create_backbone("resnet20", in_chans=1)  # pooled features [B, 64]

:func:`create_backbone` is the entry point used by the training code: it checks the name first,
builds the model without a classifier (``num_classes=0``) so that ``forward`` returns pooled
features ``[B, num_features]``, and optionally loads weights from a local state-dict file (no
network access, a strict key check whose error names the offending keys).
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import timm
from timm.models import load_state_dict, register_model, split_model_name_tag
from torch import Tensor, nn

from lightning_stl.errors import PicklableError

__all__ = [
    "PretrainedFileError",
    "check_state_fits",
    "check_unused_kwargs",
    "create_backbone",
    "list_backbones",
    "load_pretrained_file",
    "register_backbone",
]

_logger = logging.getLogger(__name__)

_FnT = TypeVar("_FnT", bound=Callable[..., nn.Module])

# name -> defining module, filled by @register_backbone when the model modules are imported
_PROJECT_BACKBONES: dict[str, str] = {}

# Keyword arguments that generic callers (timm's training scripts, configs shared between
# architectures) pass to every model; a model without the feature accepts them when they are off.
_OFF_WHEN_FALSY = ("drop_path_rate", "drop_block_rate")

# How many key names an error message shows per kind (missing / unexpected / wrong shape).
_MAX_KEYS_SHOWN = 12


def register_backbone(fn: _FnT) -> _FnT:
    """Register a model entry point in timm's registry and record it as this project's backbone.

    ``fn`` is a timm entry point ``fn(pretrained: bool = False, **kwargs) -> nn.Module`` whose
    ``__name__`` is the model name; its module's ``default_cfgs`` dict holds the pretrained
    config under that name (see :func:`timm.models.register_model`).
    """
    register_model(fn)
    _PROJECT_BACKBONES[fn.__name__] = fn.__module__
    return fn


def list_backbones() -> list[str]:
    """Sorted names of this project's backbones (every name in ``timm.list_models()`` works too)."""
    return sorted(_PROJECT_BACKBONES)


def check_unused_kwargs(kwargs: Mapping[str, Any], owner: str) -> None:
    """Reject keyword arguments a model constructor received but does not understand.

    timm's factory removes its own options (``pretrained_cfg``, ``features_only``, ...) before the
    constructor is called and drops arguments whose value is ``None``; what is left here is either
    an option that is switched off (``drop_path_rate=0``), which is ignored, or a mistake, which
    raises ``TypeError`` instead of being silently ignored.
    """
    unused = {
        k: v for k, v in kwargs.items() if v is not None and not (k in _OFF_WHEN_FALSY and not v)
    }
    if unused:
        names = ", ".join(f"{k}={v!r}" for k, v in unused.items())
        raise TypeError(f"{owner} got unsupported keyword argument(s): {names}")


class PretrainedFileError(PicklableError, ValueError):
    """A pretrained state-dict file does not fit the model it is loaded into.

    ``missing`` are the model's keys absent from the file, ``unexpected`` the file's keys the
    model does not have, ``mismatched`` maps keys present in both to ``(file shape, model
    shape)``.
    """

    def __init__(
        self,
        path: Path,
        model_name: str,
        missing: list[str],
        unexpected: list[str],
        mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]],
    ) -> None:
        self._keep((path, model_name, missing, unexpected, mismatched), {})
        parts = []
        if missing:
            parts.append(f"missing keys: {_show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_show(unexpected)}")
        if mismatched:
            shapes = [
                f"{k} (file {list(a)} vs model {list(b)})" for k, (a, b) in mismatched.items()
            ]
            parts.append(f"shape mismatch: {_show(shapes)}")
        text = f"pretrained file '{path}' does not fit backbone '{model_name}': " + "; ".join(parts)
        if any(
            len(a) == len(b) == 4 and a[0] == b[0] and a[1] != b[1] for a, b in mismatched.values()
        ):
            text += " (a conv weight differs in input channels: was the file saved with another in_chans?)"
        super().__init__(text)
        self.path = path
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched


def _show(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_KEYS_SHOWN])
    if len(items) > _MAX_KEYS_SHOWN:
        shown += f", ... ({len(items)} in all)"
    return shown


def _suggest(name: str, n: int = 3, cutoff: float = 0.75) -> list[str]:
    """Up to ``n`` registered names close to ``name``, this project's first among equals."""
    ours = list_backbones()
    candidates = ours + [m for m in timm.list_models() if m not in _PROJECT_BACKBONES]
    matcher = difflib.SequenceMatcher(b=name.lower())
    scored = []
    for candidate in candidates:
        matcher.set_seq1(candidate.lower())
        if matcher.real_quick_ratio() >= cutoff and matcher.ratio() >= cutoff:
            scored.append((matcher.ratio(), candidate))
    scored.sort(key=lambda item: -item[0])  # stable: ties keep this project's names first
    return [candidate for _, candidate in scored[:n]]


def _check_name(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` (optionally ``arch.tag``) is in timm's registry."""
    arch = split_model_name_tag(name)[0] if isinstance(name, str) else None
    if arch is not None and timm.is_model(arch):
        return
    text = f"unknown backbone {name!r}"
    close = _suggest(name) if isinstance(name, str) else []
    if close:
        text += " (did you mean " + " or ".join(repr(c) for c in close) + "?)"
    text += (
        f"; this project's backbones: {', '.join(list_backbones())}; "
        "any name in timm.list_models() works too"
    )
    raise ValueError(text)


def check_state_fits(model: nn.Module, state: Mapping[str, Any], path: str | Path) -> None:
    """Raise :class:`PretrainedFileError` naming the missing, unexpected and wrongly shaped keys
    unless ``state`` has exactly the keys and shapes of ``model.state_dict()``."""
    target = model.state_dict()
    missing = sorted(k for k in target if k not in state)
    unexpected = sorted(k for k in state if k not in target)
    mismatched = {
        k: (tuple(v.shape), tuple(target[k].shape))
        for k, v in state.items()
        if k in target and isinstance(v, Tensor) and v.shape != target[k].shape
    }
    if missing or unexpected or mismatched:
        name = (getattr(model, "pretrained_cfg", None) or {}).get(
            "architecture", type(model).__name__
        )
        raise PretrainedFileError(Path(path), name, missing, unexpected, mismatched)


def load_pretrained_file(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a local state-dict file into ``model`` (in place, no network) with a strict key check.

    The file is read with :func:`timm.models.load_state_dict`, so ``.pth``/``.pt`` files (a plain
    state dict, or a checkpoint dict holding it under ``state_dict``/``model``/``state_dict_ema``),
    ``.safetensors`` files and ``module.``-prefixed keys from DDP all work. Classifier weights in
    the file (the keys of ``model.pretrained_cfg["classifier"]``, e.g. ``fc.weight``) are dropped
    when the model has no classifier of that name, so a file saved from a classification model
    loads into its backbone (``num_classes=0``). Any other difference raises
    :class:`PretrainedFileError` naming the missing, unexpected and wrongly shaped keys.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained file '{path}' does not exist")
    state: dict[str, Any] = dict(load_state_dict(str(path), weights_only=True))
    target = model.state_dict()

    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    for head in heads:
        for key in [k for k in state if k.startswith(head + ".") and k not in target]:
            del state[key]

    check_state_fits(model, state, path)
    model.load_state_dict(state, strict=True)
    _logger.info("loaded pretrained weights from %s", path)
    return model


def create_backbone(
    name: str,
    in_chans: int = 3,
    drop_rate: float = 0.0,
    pretrained_file: str | Path | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build the feature extractor ``name`` (this project's or any timm model) without classifier.

    Args:
        name: A name from :func:`list_backbones` or ``timm.list_models()`` (``arch`` or
            ``arch.tag``). Checked before anything is built.
        in_chans: Channels ``C`` of the input images ``[B, C, H, W]``.
        drop_rate: Dropout rate in the model's sense: for timm models and this project's ResNets
            and digits CNN, dropout on the pooled features (train mode only); for the
            Wide ResNets, dropout between the two convolutions of every block.
        pretrained_file: Optional local state-dict file loaded with :func:`load_pretrained_file`
            (strict; classifier weights in the file are ignored). Nothing is downloaded:
            ``pretrained=True`` is never passed to timm.
        **kwargs: Further constructor arguments passed through ``timm.create_model``.

    Returns:
        A module with ``num_classes == 0`` whose ``forward(x)`` maps ``[B, in_chans, H, W]`` to
        pooled features ``[B, model.num_features]``; ``forward_features`` gives the unpooled map.

    Raises:
        ValueError: ``name`` is unknown; the message lists this project's backbones.
        PretrainedFileError: the file's keys or shapes do not fit the model.
    """
    _check_name(name)
    model = timm.create_model(
        name, pretrained=False, num_classes=0, in_chans=in_chans, drop_rate=drop_rate, **kwargs
    )
    if pretrained_file is not None:
        load_pretrained_file(model, pretrained_file)
    return model
