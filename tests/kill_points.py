"""A callback that kills its own process (SIGKILL, no clean-up) at a chosen moment of a run.

Added to a run as ``+callbacks.kill._target_=tests.kill_points.KillAt`` with ``stage``,
``moment`` and ``step``: the test of resumption (``tests/test_kill_and_resume.py``) kills runs
with it at many moments and checks that the resumed runs end as the uninterrupted one does.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch

MOMENTS = (
    "before_optimizer_step",
    "train_batch_end",
    "validation",
    "checkpoint_write",
    "fit_end",
)


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAt(L.Callback):
    """SIGKILL in stage ``stage`` at optimiser step ``step`` (``trainer.global_step`` when the
    moment comes), at ``moment``:

    * ``before_optimizer_step``: inside the step, after the backward pass, before the update;
    * ``train_batch_end``: after the step, before the callbacks that follow this one;
    * ``validation``: after the first validation batch of a validation at that step;
    * ``checkpoint_write``: halfway through writing the ``write``-th checkpoint file at or after
      that step (``torch.save`` writes half of the bytes, then the process dies);
    * ``fit_end``: when the stage's ``Trainer.fit`` has ended (its last checkpoint written),
      before the run records the stage as finished (``step`` is not used).
    """

    def __init__(self, stage: str, moment: str, step: int = 0, write: int = 1):
        if moment not in MOMENTS:
            raise ValueError(f"moment={moment!r}; allowed: {', '.join(MOMENTS)}")
        self.stage, self.moment, self.step = stage, moment, int(step)
        self.write, self.writes = int(write), 0

    def _here(self, trainer: L.Trainer, step: int | None = None) -> bool:
        folder = Path(trainer.checkpoint_callback.dirpath or "")
        return folder.name == self.stage and trainer.global_step == (
            self.step if step is None else step
        )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.moment != "checkpoint_write":
            return
        real_save, callback = torch.save, self

        def save_half_then_die(obj: Any, handle: Any, *args: Any, **kwargs: Any) -> None:
            if (
                Path(trainer.checkpoint_callback.dirpath or "").name == callback.stage
                and trainer.global_step >= callback.step
                and hasattr(handle, "write")
            ):
                callback.writes += 1
            if callback.writes == callback.write and hasattr(handle, "write"):
                import io

                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                data = buffer.getvalue()
                handle.write(data[: len(data) // 2])
                handle.flush()
                os.fsync(handle.fileno())
                die()
            real_save(obj, handle, *args, **kwargs)

        self._real_save, torch.save = real_save, save_half_then_die

    def on_before_optimizer_step(self, trainer: L.Trainer, *args: Any) -> None:
        if self.moment == "before_optimizer_step" and self._here(trainer, self.step - 1):
            die()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.moment == "train_batch_end" and self._here(trainer):
            die()

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.moment == "validation" and self._here(trainer):
            die()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if getattr(self, "_real_save", None) is not None:
            torch.save, self._real_save = self._real_save, None
        folder = Path(trainer.checkpoint_callback.dirpath or "")
        if self.moment == "fit_end" and stage == "fit" and folder.name == self.stage:
            die()
