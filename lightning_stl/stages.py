"""The stages of a method: one ``Trainer.fit`` each, finished stages skipped, an unfinished one
resumed from its ``last.ckpt``; each writes ``checkpoints/<stage>/stage.json`` when it ends."""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from lightning.pytorch.callbacks import Callback, LambdaCallback, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from lightning_stl import errors
from lightning_stl.callbacks import (
    DivergenceGuard,
    RandomStateCheckpoint,
    ResumeCheckpoint,
    RunStep,
)
from lightning_stl.checkpoint_io import AtomicCheckpointIO, read_checkpoint
from lightning_stl.data import SourceTargetDataModule
from lightning_stl.errors import parameters_of, unexpected_keyword
from lightning_stl.instantiators import instantiate_group
from lightning_stl.run_files import _float, _write_json
from lightning_stl.run_fraction import check_shortenable, shortened_trainer_arguments
from lightning_stl.schedule import TARGET, TargetWeightSchedule, TargetWeightScheduler

log = logging.getLogger(__name__)


STAGE_FILE = "stage.json"


@dataclass
class Stage:
    """One ``Trainer.fit`` of a method: how long, on which data, with which λ(t)."""

    name: str
    epochs: int
    epoch_basis: str
    target_weight: TargetWeightSchedule
    copy_source_batchnorm: bool = False
    max_steps: int | None = None
    """Optimiser steps of the stage (SMILE counts iterations); ``None``: ``epochs`` epochs."""
    validates_target: bool = True
    """Whether the data has a validation split (fine-grained protocols train on every image)."""

    @classmethod
    def from_config(cls, conf: DictConfig) -> Stage:
        epochs = conf.epochs
        if not isinstance(epochs, int) or epochs < 1:
            raise ValueError(
                f"stage {conf.name!r}: epochs={epochs} is not allowed: it must be an integer >= 1"
            )
        max_steps = conf.get("max_steps")
        if max_steps is not None and (
            isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1
        ):
            raise ValueError(
                f"stage {conf.name!r}: max_steps={max_steps} is not allowed: it must be an "
                "integer >= 1, or null to train for `epochs` epochs"
            )
        try:
            schedule = hydra.utils.instantiate(conf.target_weight, _convert_="all")
        except InstantiationException as error:
            key = unexpected_keyword(error)
            if key is None:
                raise
            name = "target_weight"
            if OmegaConf.is_interpolation(conf, "target_weight"):
                raw = OmegaConf.to_container(conf, resolve=False)["target_weight"]
                name = str(raw).strip("${}")
            target = hydra.utils.get_class(conf.target_weight._target_)
            raise ValueError(
                f"{name}.{key} is not a setting of {target.__name__} (stage {conf.name!r}); "
                f"its settings: {', '.join(parameters_of(target))}"
            ) from None
        return cls(
            name=str(conf.name),
            epochs=epochs,
            epoch_basis=str(conf.epoch_basis),
            target_weight=schedule,
            copy_source_batchnorm=bool(conf.get("copy_source_batchnorm", False)),
            max_steps=max_steps,
        )

    @property
    def validates(self) -> bool:
        """A stage validates (and early-stops) only when it trains the target head on data that
        has a validation split."""
        return self.validates_target and TARGET in self.target_weight.domains()

    @property
    def trains_target(self) -> bool:
        return TARGET in self.target_weight.domains()


#: Below this λ(t) at every step, a stage trains the target head in name only.
NEVER_TARGET = 1e-3


def check_reaches_target(stage: Stage, datamodule: SourceTargetDataModule) -> None:
    """Refuse a stage whose schedule gives the target loss (almost) no weight at every step,
    e.g. ``method.target_weight.t0=1e9``: its run would report an untrained target head."""
    if not stage.trains_target or stage.target_weight.domains() == (TARGET,):
        return
    datamodule.configure_training(stage.target_weight.domains(), stage.epoch_basis)
    total = stage.max_steps or stage.epochs * datamodule.steps_per_epoch()
    weights = [stage.target_weight(t, total) for t in range(1, total + 1)]
    if max(weights) < NEVER_TARGET:
        settings = ", ".join(f"{k}={v}" for k, v in stage.target_weight.describe().items())
        raise ValueError(
            f"method.target_weight gives λ(t) < {NEVER_TARGET} at every one of the {total} steps "
            f"of stage {stage.name!r}: the target head would never be trained ({settings}). "
            "Keep t0 within the run (relative: |t0| < 0.5) and alpha within a few units of 0"
        )


def stage_callback_configs(
    cfg: DictConfig, stage: Stage, checkpoint_dir: Path
) -> dict[str, dict[str, Any]]:
    """``cfg.callbacks`` as ``stage`` runs them: checkpoints written into ``checkpoint_dir``, the
    best one saved when its validation ends (Lightning would wait for the epoch's end when
    validating once an epoch; ``last.ckpt``, written after it, must know it), no progress bar
    when it is off, and what monitors validation only where the stage validates."""
    configs: dict[str, dict[str, Any]] = {}
    for key, conf in (cfg.get("callbacks") or {}).items():
        if not isinstance(conf, DictConfig):
            configs[key] = conf  # null, or refused by instantiate_group with its key
            continue
        target = str(conf.get("_target_", ""))
        if "ProgressBar" in target and not cfg.trainer.get("enable_progress_bar", True):
            continue
        overrides: dict[str, Any] = {}
        if target.endswith("ResumeCheckpoint"):
            overrides = {"dirpath": str(checkpoint_dir)}
        elif target.endswith("ModelCheckpoint"):
            overrides = {
                "dirpath": str(checkpoint_dir),
                "save_last": False,
                "save_on_train_epoch_end": False,
            }
            if not stage.validates:
                overrides.update(monitor=None, save_top_k=0)
        elif str(conf.get("monitor", "")).startswith("val/") and not stage.validates:
            log.info("stage %s does not validate: callback %s left out", stage.name, key)
            continue
        configs[key] = {**OmegaConf.to_container(conf, resolve=True), **overrides}
    return configs


def stage_callbacks(cfg: DictConfig, stage: Stage, checkpoint_dir: Path) -> list[Callback]:
    """The callbacks of :func:`stage_callback_configs`, the best checkpoint first (it is
    ``trainer.checkpoint_callback``), and a :class:`~lightning_stl.callbacks.ResumeCheckpoint`
    with its defaults when the config has none (``last.ckpt``, to resume from)."""
    callbacks = instantiate_group(stage_callback_configs(cfg, stage, checkpoint_dir), "callbacks")
    best = [
        c
        for c in callbacks
        if isinstance(c, ModelCheckpoint) and not isinstance(c, ResumeCheckpoint)
    ]
    if not best:
        raise ValueError(
            "callbacks.model_checkpoint is required: every run tests its best checkpoint"
        )
    callbacks = [*best, *(c for c in callbacks if not any(c is b for b in best))]
    if not any(isinstance(c, ResumeCheckpoint) for c in callbacks):
        callbacks.append(ResumeCheckpoint(dirpath=str(checkpoint_dir)))
    return callbacks


def run_stage(
    cfg: DictConfig,
    stage: Stage,
    index: int,
    module: L.LightningModule,
    datamodule: SourceTargetDataModule,
    run_dir: Path,
    trainer_overrides: dict[str, Any],
    load_finished: bool = True,
    step_offset: int = 0,
) -> dict[str, Any]:
    """Fit one stage (or pick up its finished result) and return its summary.

    A finished stage's final weights are loaded into ``module`` when ``load_finished``;
    ``step_offset`` is the steps of the stages before it (``run_step`` of the checkpoint names)."""
    stage_dir = run_dir / "checkpoints" / stage.name
    done = stage_dir / STAGE_FILE
    datamodule.configure_training(
        stage.target_weight.domains(), stage.epoch_basis, seed=cfg.seed + index
    )
    if done.exists():
        summary = read_stage_file(done, run_dir, stage.name)
        if load_finished:
            state = read_checkpoint(
                summary["last_model_path"], f"load the finished stage {stage.name!r}"
            )
            module.load_state_dict(state["state_dict"])
        log.info("stage %s already finished (%s)", stage.name, summary["last_model_path"])
        return summary

    L.seed_everything(cfg.seed + index, workers=True, verbose=False)
    if stage.copy_source_batchnorm:
        module.model.copy_source_statistics_to_target()
    scheduler = TargetWeightScheduler(stage.target_weight)
    guard = DivergenceGuard()
    callbacks = stage_callbacks(cfg, stage, stage_dir)
    if stage.trains_target:
        callbacks += instantiate_group(cfg.method.get("callbacks"), "method.callbacks")
    extra: dict[str, Any] = {}
    if not stage.validates:
        extra = {"limit_val_batches": 0, "num_sanity_val_steps": 0}
    val_every = cfg.get("val_every_n_steps")
    if stage.validates and val_every:
        # small N: an epoch is one or two steps; validating every epoch would dominate the run
        per_epoch = datamodule.steps_per_epoch()
        epochs = math.ceil(stage.max_steps / per_epoch) if stage.max_steps else stage.epochs
        extra["check_val_every_n_epoch"] = min(epochs, max(1, round(val_every / per_epoch)))
    if stage.max_steps is not None:
        extra.update(max_epochs=-1, max_steps=stage.max_steps)
    else:
        extra.update(max_epochs=stage.epochs)
    fraction = float(cfg.get("run_fraction", 1.0))
    if fraction < 1.0:
        every = extra.get("check_val_every_n_epoch", cfg.trainer.get("check_val_every_n_epoch"))
        extra.update(
            shortened_trainer_arguments(
                cfg.trainer, stage.max_steps, stage.epochs, datamodule.steps_per_epoch(),
                every, stage.validates, fraction,
            )
        )  # fmt: skip
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=[
            scheduler,
            guard,
            RandomStateCheckpoint(),
            RunStep(step_offset),
            LambdaCallback(on_train_batch_start=lambda *_: errors.mark_training_started()),
            *callbacks,
        ],
        plugins=[AtomicCheckpointIO()],  # a kill or a full disk never leaves a partial file
        logger=instantiate_group(cfg.get("logger"), "logger", version=stage.name),
        default_root_dir=str(run_dir),
        **extra,
        **trainer_overrides,
    )
    last = stage_dir / "last.ckpt"
    if last.exists():  # a damaged file stops here with its name, not deep inside the fit
        read_checkpoint(last, f"resume the unfinished stage {stage.name!r}")
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if last.exists() else None)
    checkpoint = trainer.checkpoint_callback
    resume = next(c for c in trainer.checkpoint_callbacks if isinstance(c, ResumeCheckpoint))
    summary: dict[str, Any] = {
        "name": stage.name,
        "epochs": stage.epochs,
        "max_steps": stage.max_steps,
        "epoch_basis": stage.epoch_basis,
        "total_steps": scheduler.total_steps,
        "schedule": stage.target_weight.describe(),
        "target_weight": [[step, scheduler.history[step]] for step in sorted(scheduler.history)],
        "last_model_path": resume.last_model_path,
        "best_model_path": checkpoint.best_model_path or None,
        "best_val_acc": _float(checkpoint.best_model_score),
        "best_step": None,
        "status": "diverged" if guard.diverged else "ok",
        **guard.describe(),
        "wall_time_s": time.perf_counter() - started,
    }
    best = summary["best_model_path"]
    if best and not Path(best).exists():
        raise FileNotFoundError(
            f"stage {stage.name!r} finished, but its best checkpoint {best} is gone: delete "
            f"{stage_dir} to train the stage again"
        )
    if not summary["last_model_path"] or not Path(summary["last_model_path"]).exists():
        trainer.save_checkpoint(last)
        summary["last_model_path"] = str(last)
    tested = summary["best_model_path"] or (
        summary["last_model_path"] if stage.trains_target else None
    )
    if tested:
        header = torch.load(tested, map_location="cpu", weights_only=True)
        summary["best_step"] = int(header["global_step"])
    _write_json(done, {**summary, **_stage_paths(summary, run_dir, relative=True)})
    return summary


def check_stage(cfg: DictConfig, stage: Stage, datamodule: SourceTargetDataModule) -> None:
    """Refuse, before any training, a stage that cannot run as configured: a schedule that never
    trains the target (:func:`check_reaches_target`), a ``run_fraction`` it cannot shorten."""
    check_reaches_target(stage, datamodule)
    fraction = float(cfg.get("run_fraction", 1.0))
    if fraction < 1.0:
        datamodule.configure_training(stage.target_weight.domains(), stage.epoch_basis)
        check_shortenable(cfg.trainer, stage.name, stage.validates, datamodule.steps_per_epoch())


_PATH_KEYS = ("last_model_path", "best_model_path")


def _stage_paths(summary: dict[str, Any], run_dir: Path, relative: bool) -> dict[str, Any]:
    """The checkpoint paths of a stage summary relative to the run folder (as ``stage.json``
    stores them, so that a copied or moved run folder reads its own files) or resolved in it."""
    paths: dict[str, Any] = {}
    for key in _PATH_KEYS:
        value = summary.get(key)
        if not value:
            paths[key] = value
        elif relative:
            path = Path(value)
            paths[key] = os.path.relpath(path, run_dir) if path.is_absolute() else value
        else:
            paths[key] = str(run_dir / value) if not Path(value).is_absolute() else value
    return paths


def read_stage_file(done: Path, run_dir: Path, stage: str) -> dict[str, Any]:
    """A finished stage's ``stage.json`` with its checkpoint paths resolved in ``run_dir``.

    Folders written before paths were stored relative hold absolute ones: a file of the same
    name in this run folder's ``checkpoints/<stage>/`` wins over the recorded location, so a
    copied folder does not read the original's checkpoints."""
    summary = json.loads(done.read_text())
    summary.update(_stage_paths(summary, run_dir, relative=False))
    for key in _PATH_KEYS:
        value = summary.get(key)
        if value:
            local = run_dir / "checkpoints" / stage / Path(value).name
            if local.exists() and Path(value) != local:
                summary[key] = str(local)
    return summary


def measure_test_accuracy(
    cfg: DictConfig,
    module: L.LightningModule,
    datamodule: SourceTargetDataModule,
    best: str,
    trainer_overrides: dict[str, Any],
) -> float:
    """The target test accuracy of checkpoint ``best`` (``trainer.test(ckpt_path=best)``), with
    the training's progress bar (Lightning would pick its Rich bar for a trainer without one)."""
    bars = [
        hydra.utils.instantiate(conf)
        for conf in (cfg.get("callbacks") or {}).values()
        if conf is not None and "ProgressBar" in str(conf.get("_target_", ""))
    ]
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        logger=False,
        callbacks=bars if cfg.trainer.get("enable_progress_bar", True) else [],
        **trainer_overrides,
    )
    read_checkpoint(best, "test the best checkpoint")  # one message for a damaged file
    with warnings.catch_warnings():  # the training's callbacks are not needed to test
        warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`.*")
        results = trainer.test(
            module, datamodule=datamodule, ckpt_path=best, weights_only=True, verbose=False
        )
    return float(results[0]["test/acc"])
