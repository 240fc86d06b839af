"""The callback that moves SMILE's mean teacher (Section 3.3) after optimiser steps."""

from __future__ import annotations

from typing import Any

import lightning as L

from lightning_stl.callbacks.optimizer_step import AfterOptimizerStep
from lightning_stl.checks import flag, integer, number


class MeanTeacherUpdate(AfterOptimizerStep):
    """θ_T ← decay·θ_T + (1 − decay)·θ_S every ``every_n_steps`` optimiser steps.

    Updates after the optimiser steps whose number (``trainer.global_step``, 1-based after the
    step) is a multiple of ``every_n_steps``; batches that only accumulate gradients do nothing.
    With ``update_before_step`` it follows the authors' code instead (``FinetuneSMILE.loss``:
    ``if iter_id % 10 == 0: mean_teacher_update()``): the update happens inside the steps with
    0-based index 0, n, 2n..., after that step's teacher forward and before the optimiser moves
    the student (Lightning's ``on_before_optimizer_step``), so the teacher gets the student's
    weights from before the step and the step's own losses still see the old teacher.

    Works with a LightningModule that has a ``teacher`` (a
    :class:`~lightning_stl.models.mean_teacher.MeanTeacher`) and a ``teacher_sources()`` method
    returning the student's ``(backbone, source classifier or None)``.

    Args:
        decay: Weight of the old teacher in [0, 1]; 1 keeps the pre-trained teacher fixed, 0 makes
            it a copy of the student.
        every_n_steps: The update period in optimiser steps (the official code: 10).
        include_classifier: Average the source-class classifier too (the official code keeps the
            pre-trained classifier: ``false``).
        average_buffers: Average the float buffers (BatchNorm's running statistics) too and copy
            the integer ones; ``false`` averages the parameters only and keeps the pre-trained
            statistics, as the official code does (it averages ``named_parameters()``).
        update_before_step: Update before the optimiser step of 0-based index 0, n, 2n... (the
            official code's order) instead of after the step numbered n, 2n...
    """

    def __init__(
        self,
        decay: float = 0.999,
        every_n_steps: int = 1,
        include_classifier: bool = True,
        average_buffers: bool = True,
        update_before_step: bool = False,
    ):
        self.decay = number("mean teacher decay", decay, at_least=0, at_most=1)
        self.every_n_steps = integer("mean teacher every_n_steps", every_n_steps, low=1)
        self.include_classifier = flag("mean teacher include_classifier", include_classifier)
        self.average_buffers = flag("mean teacher average_buffers", average_buffers)
        self.update_before_step = flag("mean teacher update_before_step", update_before_step)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if getattr(pl_module, "teacher", None) is None:
            raise ValueError(
                f"{type(pl_module).__name__} has no mean teacher to update: the teacher exists "
                "when feature_mixup_weight > 0 or label_mixup_weight > 0 (SMILE); remove the "
                "mean_teacher callback from method.callbacks otherwise"
            )
        super().on_fit_start(trainer, pl_module)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        # global_step counts the steps already taken: the 0-based index of the coming one
        if self.update_before_step and trainer.global_step % self.every_n_steps == 0:
            self._update(pl_module)

    def after_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, step: int
    ) -> None:
        if not self.update_before_step and step % self.every_n_steps == 0:
            self._update(pl_module)

    def _update(self, pl_module: L.LightningModule) -> None:
        backbone, classifier = pl_module.teacher_sources()
        pl_module.teacher.update(
            backbone, classifier, self.decay, self.include_classifier, self.average_buffers
        )
