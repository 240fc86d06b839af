"""What every method's LightningModule shares: the training-loss log, target validation and test."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from lightning_stl.loggers import logs_this_step
from lightning_stl.optim import SGDConfig, scheduler_state_from_lambda_lr


class TargetEvaluation(L.LightningModule):
    """Logs ``val/loss``, ``val/acc``, ``test/loss`` and ``test/acc`` of ``self(x)`` (target logits
    ``[B, K_T]``) on the target's validation and test batches ``(x, y)``."""

    def __init__(self, num_target_classes: int):
        super().__init__()
        self.val_accuracy = MulticlassAccuracy(num_target_classes, average="micro")
        self.test_accuracy = MulticlassAccuracy(num_target_classes, average="micro")

    def log_training_loss(self, loss: Tensor, parts: dict[str, Tensor]) -> None:
        """``train/loss`` (on the progress bar) and each part as ``train/loss_<name>``, on the
        steps the loggers write (:func:`~lightning_stl.loggers.logs_this_step`)."""
        if not logs_this_step(self.trainer):
            return
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        values = {f"train/loss_{name}": value for name, value in parts.items()}
        self.log_dict(values, on_step=True, on_epoch=False)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint of an older version keeps a ``LambdaLR`` state: it becomes the state of
        today's torch schedulers at the same step (:func:`scheduler_state_from_lambda_lr`)."""
        config = getattr(self, "optimizer_config", None)
        states = checkpoint.get("lr_schedulers") or []
        if isinstance(config, SGDConfig) and any("lr_lambdas" in s for s in states):
            checkpoint["lr_schedulers"] = [
                scheduler_state_from_lambda_lr(config, s) if "lr_lambdas" in s else s
                for s in states
            ]

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_accuracy.update(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), on_epoch=True, batch_size=len(y))
        self.log("val/acc", self.val_accuracy, on_epoch=True, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.test_accuracy.update(logits, y)
        self.log("test/loss", F.cross_entropy(logits, y), on_epoch=True, batch_size=len(y))
        self.log("test/acc", self.test_accuracy, on_epoch=True)
