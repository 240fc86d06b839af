"""The target test accuracy of a checkpoint, counted here: argmax of each test image's logits
against its label, over the whole test set, in one process (no Trainer, no torchmetrics)."""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig


def checkpoint_test_accuracy(
    cfg: DictConfig, checkpoint: str | Path, module_class: type[L.LightningModule]
) -> float:
    """Accuracy on ``cfg.data``'s target test set of ``module_class`` loaded from ``checkpoint``."""
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("fit")
    module = module_class.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    module.eval()
    correct = seen = 0
    with torch.no_grad():
        for images, labels in datamodule.test_dataloader():
            logits = module(datamodule.preprocess("target", images, train=False))
            correct += int((logits.argmax(dim=1) == labels).sum())
            seen += len(labels)
    assert seen == len(datamodule.test_set)
    return correct / seen
