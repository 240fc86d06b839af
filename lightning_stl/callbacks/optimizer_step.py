"""A callback base for work done once after every optimiser step."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class AfterOptimizerStep(Callback):
    """Calls :meth:`after_optimizer_step` once after each optimiser step.

    ``trainer.global_step`` counts optimiser steps, so a batch after which it has not changed
    only accumulated gradients and is skipped. A resumed fit counts from its checkpoint's step.
    """

    _last_step = 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *hook_args: Any
    ) -> None:
        """After each batch; ``hook_args`` (outputs, batch, batch_idx) are not needed."""
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        self.after_optimizer_step(trainer, pl_module, step)

    def after_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, step: int
    ) -> None:
        """The work of one optimiser step; ``step`` is ``trainer.global_step`` (1-based)."""
        raise NotImplementedError
