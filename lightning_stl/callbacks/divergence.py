"""Stop a run whose training loss stops being finite."""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import torch

from lightning_stl.checks import integer

log = logging.getLogger(__name__)


class DivergenceGuard(L.Callback):
    """Ends training at the first non-finite (NaN or ±inf) training loss it sees.

    The loss is read every ``check_every`` optimiser steps (reading it synchronises a GPU, so not
    every step by default) and always at the last step of an epoch. After a divergence
    :attr:`diverged_at` holds the step and :attr:`diverged_loss` the value; the run then reports
    itself as ``diverged`` (see :func:`lightning_stl.run.train`), so that a hyper-parameter search
    records a finite worst value instead of crashing on NaN.
    """

    def __init__(self, check_every: int = 10):
        self.check_every = integer("DivergenceGuard check_every", check_every, low=1)
        self.diverged_at: int | None = None
        self.diverged_loss: float | None = None

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        last_of_epoch = batch_idx + 1 == trainer.num_training_batches
        if trainer.global_step % self.check_every and not last_of_epoch:
            return
        if bool(torch.isfinite(loss.detach()).all()):
            return
        self.diverged_at = trainer.global_step
        self.diverged_loss = float(loss.detach().float().cpu())
        log.warning(
            "training diverged: loss %s at step %d; stopping", self.diverged_loss, self.diverged_at
        )
        trainer.should_stop = True

    @property
    def diverged(self) -> bool:
        return self.diverged_at is not None

    def describe(self) -> dict[str, Any]:
        loss = self.diverged_loss
        return {
            "diverged_at_step": self.diverged_at,
            "diverged_loss": None if loss is None else (loss if math.isfinite(loss) else str(loss)),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"diverged_at": self.diverged_at, "diverged_loss": self.diverged_loss}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.diverged_at = state_dict.get("diverged_at")
        self.diverged_loss = state_dict.get("diverged_loss")
