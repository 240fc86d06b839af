"""``last.ckpt`` on a fixed interval of work, whatever validation does, for a run to resume from."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_stl.checks import integer

log = logging.getLogger(__name__)


class ResumeCheckpoint(ModelCheckpoint):
    """Writes ``<dirpath>/last.ckpt`` every ``every_n_train_steps`` optimiser steps or
    ``every_n_minutes`` of training (whichever comes first), after every validation, and when
    training ends.

    Lightning's ``ModelCheckpoint(save_last=True)`` with a monitored metric writes ``last.ckpt``
    only when it saves a new best, so a stage that does not validate (the source stage of
    ``finetune``, SMILE's pre-training) or a run that stops improving has no recent checkpoint.
    This is a ``ModelCheckpoint`` (Lightning runs checkpoint callbacks last, in their order, so
    it saves after the best-model checkpoint has recorded a new best) that only writes
    ``last.ckpt``.

    A step that ends in a validation is saved after that validation, never before it: Lightning
    treats the validation of the step a checkpoint was written at as done, so a run resumed from
    a checkpoint written just before it would skip it.

    On resume it also mends what a moved folder or a kill may have left in the checkpoint
    callbacks' states: paths under the folder the run was written in are read in this one, and
    a best checkpoint that no longer exists (a kill between the deletion of the previous best
    and the next ``last.ckpt``) is forgotten with a warning, so that the next validation saves
    one again instead of the run failing at its end.
    """

    def __init__(
        self,
        dirpath: str | Path | None = None,
        every_n_train_steps: int | None = 500,
        every_n_minutes: float | None = 5.0,
    ):
        integer(
            "callbacks.resume_checkpoint.every_n_train_steps",
            every_n_train_steps,
            low=1,
            null=True,
            also="null",
        )
        if every_n_minutes is not None and (
            isinstance(every_n_minutes, bool)
            or not isinstance(every_n_minutes, int | float)
            or not math.isfinite(every_n_minutes)
            or every_n_minutes <= 0
        ):
            raise ValueError(
                f"callbacks.resume_checkpoint.every_n_minutes={every_n_minutes!r} is not allowed: "
                "it must be a number > 0, or null"
            )
        super().__init__(dirpath=dirpath, monitor=None, save_top_k=0, save_last=False)
        self.every_n_steps = every_n_train_steps
        self.every_n_minutes = every_n_minutes
        self._last_saved_at = time.monotonic()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(resume_checkpoint="last")

    @property
    def path(self) -> Path:
        return Path(self.dirpath or ".") / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"

    # ------------------------------------------------------------------ when to save
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        if self._should_skip_saving_checkpoint(trainer) or not self._due(trainer):
            return
        if _validates_after_this_batch(trainer):
            return  # saved in on_validation_end, after the validation
        self._save(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self._save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Nothing: the interval and the validations decide (ModelCheckpoint would save here)."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.fast_dev_run:
            self._save(trainer)

    def _due(self, trainer: L.Trainer) -> bool:
        # accumulated gradients are not saved; Lightning's own test of it is private (no public)
        if trainer.fit_loop._should_accumulate():
            return False
        by_steps = bool(self.every_n_steps) and trainer.global_step % self.every_n_steps == 0
        by_time = False
        if self.every_n_minutes is not None:
            elapsed = time.monotonic() - self._last_saved_at
            # every process must take the same decision (a save is collective under DDP)
            by_time = bool(trainer.strategy.broadcast(elapsed >= 60 * self.every_n_minutes))
        return by_steps or by_time

    def _save(self, trainer: L.Trainer) -> None:
        self.last_model_path = str(self.path)  # before saving: it is part of the state
        self._save_checkpoint(trainer, str(self.path))
        self._last_saved_at = time.monotonic()

    # ------------------------------------------------------------------ mending on resume
    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Before the callbacks read their states: paths of a run folder that was moved or
        copied point into this one (Lightning would keep the original's best path)."""
        states = checkpoint.get("callbacks", {})
        for callback in trainer.checkpoint_callbacks:
            state = states.get(getattr(callback, "state_key", None))
            if not state or not state.get("dirpath") or not callback.dirpath:
                continue
            old, new = str(state["dirpath"]), str(callback.dirpath)
            if old == new:
                continue
            for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
                if state.get(key):
                    state[key] = _moved(state[key], old, new)
            if state.get("best_k_models"):
                state["best_k_models"] = {
                    _moved(path, old, new): score for path, score in state["best_k_models"].items()
                }
            state["dirpath"] = new
            log.info("checkpoint paths of %s read in %s", old, new)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_saved_at = time.monotonic()
        for callback in trainer.checkpoint_callbacks:
            best = getattr(callback, "best_model_path", "")
            if callback is self or not best or Path(best).exists():
                continue
            log.warning(
                "the best checkpoint %s recorded by the checkpoint being resumed is gone (the run "
                "was killed while checkpoints were replaced); the best is chosen again from the "
                "next validation on",
                best,
            )
            kept = {p: s for p, s in callback.best_k_models.items() if Path(p).exists()}
            callback.best_k_models = kept
            if kept:  # the best and the k-th of the checkpoints that are left
                pick = max if callback.mode == "max" else min
                worst = min if callback.mode == "max" else max
                callback.best_model_path = pick(kept, key=lambda p: float(kept[p]))
                callback.best_model_score = kept[callback.best_model_path]
                callback.kth_best_model_path = worst(kept, key=lambda p: float(kept[p]))
                callback.kth_value = kept[callback.kth_best_model_path]
            else:
                callback.best_model_path, callback.best_model_score = "", None
                callback.kth_best_model_path = ""


def _moved(path: str, old: str, new: str) -> str:
    return str(Path(new) / Path(path).relative_to(old)) if Path(path).is_relative_to(old) else path


def _validates_after_this_batch(trainer: L.Trainer) -> bool:
    """Whether Lightning runs a validation right after the batch that just ended.

    Asks the training epoch loop's own rule (``_should_check_val_fx``, private in Lightning
    2.x; ``tests/test_kill_and_resume.py::test_the_resume_checkpoint_knows_which_steps_validate``
    fails if it goes away or changes).
    """
    loop = trainer.fit_loop.epoch_loop
    return bool(loop._should_check_val_fx(trainer.fit_loop._data_fetcher))
