"""The LightningModule of ``cfg.method``: Smooth Transfer, or fine-tuning from a source model
with the method's regularisers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from lightning_stl.building import _backbone_options, build_smooth_transfer
from lightning_stl.config_files import _config_dir
from lightning_stl.data import SourceTargetDataModule
from lightning_stl.pretraining import resolve_source_model


def build_module(
    cfg: DictConfig, datamodule: SourceTargetDataModule, device: torch.device | None = None
) -> L.LightningModule:
    """The LightningModule of ``cfg.method`` (``method.module._target_``; SmoothTransfer when
    absent), sized for ``datamodule``. A fine-tuning module starts from the source model of
    :func:`resolve_source_model`."""
    module_conf = cfg.method.get("module")
    target = module_conf.get("_target_") if module_conf is not None else None
    if target is None or target.endswith("SmoothTransfer"):
        return build_smooth_transfer(cfg, datamodule)
    pretraining = cfg.get("pretraining") or {}
    on_source = bool(pretraining.get("on_source"))
    if on_source and cfg.batchnorm != "shared":
        raise ValueError(
            f"pretraining.on_source=true needs batchnorm=shared, got batchnorm={cfg.batchnorm!r}: "
            "the fine-tuned model has one set of BatchNorm statistics"
        )
    # Build (and so check) the module before any pre-training, with the model's initial weights
    # drawn from the run's seed whether or not the pre-training is cached.
    source = None if on_source else resolve_source_model(cfg, datamodule)
    if on_source:
        num_source_classes = datamodule.num_source_classes
    else:
        num_source_classes = source.num_classes if source is not None else None
    mixup_alpha, regularizers = resolve_regularizers(cfg.method.get("regularizers") or [], cfg)
    extra: dict[str, Any] = {}
    if regularizers:
        extra["regularizers"] = [*(module_conf.get("regularizers") or []), *regularizers]
    if mixup_alpha is not None:
        extra["mixup_alpha"] = mixup_alpha
    module = hydra.utils.instantiate(
        module_conf,
        **extra,
        backbone=cfg.backbone.name,
        backbone_options=_backbone_options(cfg),
        in_chans=cfg.backbone.in_chans,
        num_target_classes=datamodule.num_target_classes,
        num_source_classes=num_source_classes,
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        _convert_="all",
    )
    if on_source:
        source = resolve_source_model(cfg, datamodule)
    if source is not None:
        module.load_source_model(source)
    elif getattr(module, "teacher", None) is not None:
        raise ValueError(
            f"method {cfg.method.name!r} regularises towards a pre-trained model, but none is "
            "given: set backbone.weights=<file or checkpoint>, backbone.pretrained=true (timm's "
            "weights, online) or pretraining.on_source=true"
        )
    if device is not None:  # regularisers' set-up (DELTA's channel estimate) on the run's device
        module.to(device)
    module.setup_regularizers(datamodule)
    return module


def resolve_regularizers(
    names: list[Any], cfg: DictConfig
) -> tuple[float | None, list[dict[str, Any]]]:
    """``method.regularizers``: names of ``conf/regularizer/<name>.yaml`` (or inline configs),
    each merged with ``method.regularizer_options.<name>``. ``mixup`` is not a module: it returns
    its α, which turns on mixup in :class:`~lightning_stl.methods.FineTune`.

    Returns ``(mixup α or None, regulariser configs to instantiate)``.
    """
    folder = Path(_config_dir()) / "regularizer"
    known = sorted(p.stem for p in folder.glob("*.yaml"))
    options = cfg.method.get("regularizer_options") or {}
    mixup_alpha, configs = None, []
    for entry in names:
        if isinstance(entry, DictConfig | dict):
            configs.append(OmegaConf.to_container(OmegaConf.create(entry), resolve=True))
            continue
        name = str(entry)
        if name not in known:
            raise ValueError(
                f"method.regularizers: unknown regulariser {name!r}; known: {', '.join(known)}"
            )
        conf = OmegaConf.merge(OmegaConf.load(folder / f"{name}.yaml"), options.get(name) or {})
        # the file may refer to ${paths.*} (where to cache what it computes): resolve it beside them
        beside = OmegaConf.create({"paths": cfg.paths, "regularizer": conf})
        resolved = OmegaConf.to_container(beside, resolve=True)["regularizer"]
        if name == "mixup":
            mixup_alpha = float(resolved["alpha"])
        else:
            configs.append(resolved)
    return mixup_alpha, configs
