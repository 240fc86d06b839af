"""The callback that moves SMILE's mean teacher (Section 3.3) after optimiser steps."""

from __future__ import annotations

import lightning as L

from lightning_stl.callbacks.optimizer_step import AfterOptimizerStep


class MeanTeacherUpdate(AfterOptimizerStep):
    """θ_T ← decay·θ_T + (1 − decay)·θ_S every ``every_n_steps`` optimiser steps.

    Updates after the optimiser steps whose number (``trainer.global_step``, 1-based after the
    step) is a multiple of ``every_n_steps``; batches that only accumulate gradients do nothing.

    Works with a LightningModule that has a ``teacher`` (a
    :class:`~lightning_stl.models.mean_teacher.MeanTeacher`) and a ``teacher_sources()`` method
    returning the student's ``(backbone, source classifier or None)``.

    Args:
        decay: Weight of the old teacher in [0, 1]; 1 keeps the pre-trained teacher fixed, 0 makes
            it a copy of the student.
        every_n_steps: The update period in optimiser steps (the official code: 10).
        include_classifier: Average the source-class classifier too (the official code keeps the
            pre-trained classifier: ``false``).
    """

    def __init__(
        self, decay: float = 0.999, every_n_steps: int = 1, include_classifier: bool = True
    ):
        if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0 <= decay <= 1:
            raise ValueError(
                f"mean teacher decay={decay!r} is not allowed: it must be a number in [0, 1]"
            )
        if (
            isinstance(every_n_steps, bool)
            or not isinstance(every_n_steps, int)
            or every_n_steps < 1
        ):
            raise ValueError(
                f"mean teacher every_n_steps={every_n_steps!r} is not allowed: "
                "it must be an integer >= 1"
            )
        self.decay = float(decay)
        self.every_n_steps = every_n_steps
        self.include_classifier = bool(include_classifier)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if getattr(pl_module, "teacher", None) is None:
            raise ValueError(
                f"{type(pl_module).__name__} has no mean teacher to update: the teacher exists "
                "when feature_mixup_weight > 0 or label_mixup_weight > 0 (SMILE); remove the "
                "mean_teacher callback from method.callbacks otherwise"
            )
        super().on_fit_start(trainer, pl_module)

    def after_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, step: int
    ) -> None:
        if step % self.every_n_steps:
            return
        backbone, classifier = pl_module.teacher_sources()
        pl_module.teacher.update(backbone, classifier, self.decay, self.include_classifier)
