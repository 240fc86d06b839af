"""Smooth Transfer Learning and its special cases as one LightningModule.

Eq. 3 of Smooth Transfer Learning (Takayama, Sato et al.):

    L = λ/|B^T| Σ_{B^T} CE(h^T(g(x)), y) + (1 − λ)/|B^S| Σ_{B^S} CE(h^S(g(x)), y)

over a target sub-batch B^T and a source sub-batch B^S, with λ = λ_ω(t) set before every step by
:class:`~lightning_stl.schedule.TargetWeightScheduler`. A constant λ gives multi-task learning
(Eq. 6); λ = 1 trains on the target alone, λ = 0 on the source alone, and a sub-batch whose weight
is exactly zero is neither forwarded nor back-propagated.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from lightning_stl.methods.evaluation import TargetEvaluation
from lightning_stl.models.registry import create_backbone
from lightning_stl.models.source_target import SourceTargetClassifier
from lightning_stl.optim import SGDConfig
from lightning_stl.schedule import SOURCE, TARGET


def smooth_transfer_loss(
    target_logits: Tensor | None,
    target_labels: Tensor | None,
    source_logits: Tensor | None,
    source_labels: Tensor | None,
    target_weight: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Eq. 3: ``λ · CE_target + (1 − λ) · CE_source``, each a mean over its sub-batch.

    A term whose weight is zero is skipped, and its logits may be ``None``. Returns the loss and
    the two cross-entropies that were computed (for logging).
    """
    parts: dict[str, Tensor] = {}
    loss: Tensor | None = None
    if target_weight > 0:
        if target_logits is None:
            raise ValueError(f"target_weight={target_weight} > 0 needs a target sub-batch")
        parts[TARGET] = F.cross_entropy(target_logits, target_labels)
        loss = target_weight * parts[TARGET]
    if target_weight < 1:
        if source_logits is None:
            raise ValueError(f"target_weight={target_weight} < 1 needs a source sub-batch")
        parts[SOURCE] = F.cross_entropy(source_logits, source_labels)
        term = (1 - target_weight) * parts[SOURCE]
        loss = term if loss is None else loss + term
    return loss, parts


class SmoothTransfer(TargetEvaluation):
    """A backbone with target and source heads trained on Eq. 3; validated and tested on the target.

    Args:
        backbone: Backbone name (this project's, e.g. ``digits_cnn``, ``resnet20``, ``wrn10_2``,
            or any timm model).
        backbone_options: Keyword options of the backbone (``drop_rate``, ``pretrained_file``...).
        in_chans: Input channels.
        num_target_classes, num_source_classes: Sizes of the two heads.
        batchnorm: ``shared`` (source and target normalised together, Appendix A.1) or
            ``per_domain`` (dataset-specific statistics, Appendix A.2).
        optimizer: Fields of :class:`~lightning_stl.optim.SGDConfig`.

    Every argument is a plain value, so ``SmoothTransfer.load_from_checkpoint(path)`` rebuilds the
    model from the checkpoint alone.
    """

    def __init__(
        self,
        backbone: str = "digits_cnn",
        backbone_options: dict[str, Any] | None = None,
        in_chans: int = 1,
        num_target_classes: int = 10,
        num_source_classes: int = 10,
        batchnorm: str = "shared",
        optimizer: dict[str, Any] | None = None,
    ):
        super().__init__(num_target_classes)
        self.save_hyperparameters()
        self.optimizer_config = SGDConfig(**(optimizer or {}))
        self.model = SourceTargetClassifier(
            create_backbone(backbone, in_chans=in_chans, **(backbone_options or {})),
            num_target_classes,
            num_source_classes,
            batchnorm,
        )
        self.target_weight: float | None = None

    def forward(self, x: Tensor) -> Tensor:
        """Target logits ``[B, K_T]`` for target images ``[B, C, H, W]``."""
        return self.model(x)[0]

    def training_step(self, batch: dict[str, tuple[Tensor, Tensor]], batch_idx: int) -> Tensor:
        weight = self.target_weight
        if weight is None:
            raise RuntimeError(
                "target_weight is unset: train SmoothTransfer with a "
                "lightning_stl.schedule.TargetWeightScheduler callback"
            )
        target = batch.get(TARGET) if weight > 0 else None
        source = batch.get(SOURCE) if weight < 1 else None
        target_logits, source_logits = self.model(
            target[0] if target is not None else None, source[0] if source is not None else None
        )
        loss, parts = smooth_transfer_loss(
            target_logits,
            target[1] if target is not None else None,
            source_logits,
            source[1] if source is not None else None,
            weight,
        )
        self.log_training_loss(loss, parts)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        return self.optimizer_config.build(self.model, int(self.trainer.estimated_stepping_batches))
