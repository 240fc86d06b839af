"""The Smooth Transfer LightningModule of a config, sized for its data."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from lightning_stl.data import SourceTargetDataModule
from lightning_stl.methods import SmoothTransfer


def _backbone_options(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg.backbone.options, resolve=True)


def build_smooth_transfer(
    cfg: DictConfig, datamodule: SourceTargetDataModule, optimizer: DictConfig | None = None
) -> SmoothTransfer:
    """A :class:`SmoothTransfer` for ``cfg``, sized for the data sets of ``datamodule``.

    ``backbone.weights`` (a local file) initialises its backbone (classifier weights ignored).
    """
    options = _backbone_options(cfg)
    if cfg.backbone.get("weights"):
        options["pretrained_file"] = cfg.backbone.weights
    return SmoothTransfer(
        backbone=cfg.backbone.name,
        backbone_options=options,
        in_chans=cfg.backbone.in_chans,
        num_target_classes=datamodule.num_target_classes,
        num_source_classes=datamodule.num_source_classes,
        batchnorm=cfg.batchnorm,
        optimizer=OmegaConf.to_container(optimizer or cfg.optimizer, resolve=True),
    )
