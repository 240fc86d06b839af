"""The pre-trained source model a fine-tuning method starts from (SMILE, Section 3.1: ω_t^0 = ω_s).

A source model is a backbone state dict plus, when there is one, the weights of its source-class
classifier, which becomes the auxiliary head of SMILE's L^FC (Eq. 5) and the teacher's classifier.
:func:`read_source_model` reads it from a local file, never touching the network:

* a timm / torchvision state dict (``.pth``, ``.pt``, ``.safetensors``; a checkpoint dict holding
  it under ``state_dict``/``model``; ``module.`` prefixes from DataParallel) such as timm's
  ImageNet ResNet-50 or EfficientNet-B4, or the Places365 ResNet-50
  (``resnet50_places365.pth.tar``, whose 365-way ``fc`` becomes the auxiliary head);
* a Lightning checkpoint of this project: a source training (``SmoothTransfer``: its
  ``model.backbone.*`` and ``model.source_head.*``) or a fine-tuning (``FineTune``).

:func:`download_source_model` takes timm's own weights for a model name (online only).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.models import load_state_dict
from torch import Tensor, nn

from lightning_stl.models.registry import PretrainedFileError, check_state_fits

log = logging.getLogger(__name__)

#: Key prefixes of this project's Lightning checkpoints: (backbone, source classifier).
_PROJECT_PREFIXES = (("model.backbone.", "model.source_head."), ("backbone.", "source_head."))


@dataclass
class SourceModel:
    """Weights of a pre-trained model: ``backbone`` (a state dict for the classifier-free backbone)
    and ``classifier`` (``{"weight": [K_S, F], "bias": [K_S]}``, or ``None``)."""

    backbone: dict[str, Tensor]
    classifier: dict[str, Tensor] | None
    origin: str

    @property
    def num_classes(self) -> int | None:
        """K_S, the number of source classes, or ``None`` without a classifier."""
        return None if self.classifier is None else int(self.classifier["weight"].shape[0])


def _classifier_names(backbone: nn.Module) -> tuple[str, ...]:
    classifier = (getattr(backbone, "pretrained_cfg", None) or {}).get("classifier")
    if classifier is None:
        return ()
    return (classifier,) if isinstance(classifier, str) else tuple(classifier)


def _split_classifier(
    state: dict[str, Tensor], names: tuple[str, ...]
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """Take a linear classifier ``<name>.weight``/``<name>.bias`` out of ``state``."""
    for name in names:
        weight = state.get(f"{name}.weight")
        if isinstance(weight, Tensor) and weight.ndim == 2:
            classifier = {"weight": state.pop(f"{name}.weight")}
            bias = state.pop(f"{name}.bias", None)
            classifier["bias"] = bias if bias is not None else torch.zeros(weight.shape[0])
            return state, classifier
    return state, None


def _project_split(state: dict[str, Tensor]) -> tuple[dict, dict | None] | None:
    """(backbone, classifier) of a state dict of this project's modules, or ``None``."""
    for backbone_prefix, head_prefix in _PROJECT_PREFIXES:
        backbone = {
            k[len(backbone_prefix) :]: v for k, v in state.items() if k.startswith(backbone_prefix)
        }
        if backbone:
            head = {k[len(head_prefix) :]: v for k, v in state.items() if k.startswith(head_prefix)}
            if "weight" not in head:
                return backbone, None
            bias = head.get("bias", torch.zeros(head["weight"].shape[0]))
            return backbone, {"weight": head["weight"], "bias": bias}
    return None


def read_source_model(path: str | Path, backbone: nn.Module) -> SourceModel:
    """Read the source model in ``path`` and check that it fits ``backbone`` (``num_classes=0``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        PretrainedFileError: the file's backbone keys or shapes do not fit ``backbone``; the
            message names the missing, unexpected and wrongly shaped keys.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone.weights='{path}' does not exist")
    try:
        state = dict(load_state_dict(str(path), weights_only=True))
    except Exception as error:  # not a (safe) torch file: pickle, zip or format errors
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise ValueError(
            f"backbone.weights='{path}' cannot be read as weights ({type(error).__name__}: "
            f"{reason}): give a state dict or checkpoint saved with torch.save (a .pth, .pt or "
            ".ckpt file of tensors)"
        ) from None
    project = _project_split(state)
    if project is not None:
        state, classifier = project
        origin = f"checkpoint {path}"
    else:
        state, classifier = _split_classifier(state, _classifier_names(backbone))
        origin = f"weights file {path}"
    check_state_fits(backbone, state, path)
    if classifier is not None and classifier["weight"].shape[1] != backbone.num_features:
        raise PretrainedFileError(
            path,
            type(backbone).__name__,
            [],
            [],
            {
                "classifier.weight": (
                    tuple(classifier["weight"].shape),
                    (classifier["weight"].shape[0], backbone.num_features),
                )
            },
        )
    log.info(
        "source model from %s (%s source classes)",
        origin,
        classifier["weight"].shape[0] if classifier else "no",
    )
    return SourceModel(state, classifier, origin)


def download_source_model(name: str, backbone: nn.Module, in_chans: int = 3) -> SourceModel:
    """timm's pre-trained weights of ``name`` (downloaded, or from timm's cache), with classifier.

    Raises ``RuntimeError`` naming the model and the way to work offline when it fails.
    """
    try:
        model = timm.create_model(name, pretrained=True, in_chans=in_chans)
    except Exception as error:  # no network, unknown tag, no weights for the name...
        raise RuntimeError(
            f"could not get timm's pre-trained weights for backbone.name={name!r}: {error}. "
            "Offline, give a local file instead: backbone.weights=/path/to/weights.pth "
            "(and backbone.pretrained=false)"
        ) from error
    state = dict(model.state_dict())
    state, classifier = _split_classifier(state, _classifier_names(model))
    check_state_fits(backbone, state, f"timm:{name}")
    return SourceModel(state, classifier, f"timm pretrained {name}")
