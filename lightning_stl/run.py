"""Hydra entry point: compose → instantiate → fit each stage → test the best checkpoint → metric.

    python -m lightning_stl.run                          # Smooth Transfer on the embedded digits
    python -m lightning_stl.run +experiment=svhn_mnist   # the paper's SVHN/MNIST setting
    python -m lightning_stl.run method=finetune data.target_size=50

A method is a list of stages (:class:`Stage`); most have one, ``finetune`` has two (source
training, then target fine-tuning of the same backbone with a new learning-rate schedule). Each
stage is one ``Trainer.fit`` whose checkpoints live in ``<run dir>/checkpoints/<stage>/``; a run
started again in the same folder (``hydra.run.dir=...``) skips finished stages and resumes the
unfinished one from its ``last.ckpt``. The run tests the checkpoint with the best target-validation
accuracy, writes ``metrics.json``, ``target_weight.csv`` and ``target_weight.png`` into the run
folder, and returns the best validation accuracy for a sweeper to maximise.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from lightning.pytorch.callbacks import Callback, LambdaCallback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from lightning_stl import errors
from lightning_stl.callbacks import (
    DivergenceGuard,
    RandomStateCheckpoint,
    ResumeCheckpoint,
    RunStep,
)
from lightning_stl.checkpoint_io import AtomicCheckpointIO, check_writable, read_checkpoint
from lightning_stl.data import SourceTargetDataModule
from lightning_stl.devices import claim_device, physical_device_names, wants_device_pool
from lightning_stl.errors import parameters_of, training_started, unexpected_keyword, user_message
from lightning_stl.methods import SmoothTransfer
from lightning_stl.models.registry import create_backbone
from lightning_stl.models.source_model import SourceModel, download_source_model, read_source_model
from lightning_stl.quiet import quiet_library_noise
from lightning_stl.reporting.learning_curve import learning_curve_series, plot_learning_curve
from lightning_stl.reporting.target_weight_plot import plot_target_weight
from lightning_stl.schedule import TARGET, TargetWeightSchedule, TargetWeightScheduler
from lightning_stl.settings_check import check_run_settings

log = logging.getLogger(__name__)

STAGE_FILE = "stage.json"


def _config_dir() -> str:
    """``conf/`` beside the package (a source checkout or an editable install)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if candidate.is_dir():
            return str(candidate)
    raise FileNotFoundError(f"no conf/ folder next to {here}; install with `pip install -e .`")


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
                name = str(conf._get_node("target_weight")._value()).strip("${}")
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


def _backbone_options(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg.backbone.options, resolve=True)


def build_smooth_transfer(
    cfg: DictConfig, datamodule: SourceTargetDataModule, optimizer: DictConfig | None = None
) -> SmoothTransfer:
    """A :class:`SmoothTransfer` for ``cfg``, sized for the data sets of ``datamodule``.

    ``backbone.weights`` (a local file) initialises its backbone (classifier weights ignored).
    """
    options = _backbone_options(cfg)
    if cfg.backbone.get("weights"):
        options["pretrained_file"] = cfg.backbone.weights
    return SmoothTransfer(
        backbone=cfg.backbone.name,
        backbone_options=options,
        in_chans=cfg.backbone.in_chans,
        num_target_classes=datamodule.num_target_classes,
        num_source_classes=datamodule.num_source_classes,
        batchnorm=cfg.batchnorm,
        optimizer=OmegaConf.to_container(optimizer or cfg.optimizer, resolve=True),
    )


def build_module(
    cfg: DictConfig, datamodule: SourceTargetDataModule, device: torch.device | None = None
) -> L.LightningModule:
    """The LightningModule of ``cfg.method`` (``method.module._target_``; SmoothTransfer when
    absent), sized for ``datamodule``. A fine-tuning module starts from the source model of
    :func:`resolve_source_model`."""
    module_conf = cfg.method.get("module")
    target = module_conf.get("_target_") if module_conf is not None else None
    if target is None or target.endswith("SmoothTransfer"):
        return build_smooth_transfer(cfg, datamodule)
    pretraining = cfg.get("pretraining") or {}
    on_source = bool(pretraining.get("on_source"))
    if on_source and cfg.batchnorm != "shared":
        raise ValueError(
            f"pretraining.on_source=true needs batchnorm=shared, got batchnorm={cfg.batchnorm!r}: "
            "the fine-tuned model has one set of BatchNorm statistics"
        )
    # Build (and so check) the module before any pre-training, with the model's initial weights
    # drawn from the run's seed whether or not the pre-training is cached.
    source = None if on_source else resolve_source_model(cfg, datamodule)
    if on_source:
        num_source_classes = datamodule.num_source_classes
    else:
        num_source_classes = source.num_classes if source is not None else None
    mixup_alpha, regularizers = resolve_regularizers(cfg.method.get("regularizers") or [], cfg)
    extra: dict[str, Any] = {}
    if regularizers:
        extra["regularizers"] = [*(module_conf.get("regularizers") or []), *regularizers]
    if mixup_alpha is not None:
        extra["mixup_alpha"] = mixup_alpha
    module = hydra.utils.instantiate(
        module_conf,
        **extra,
        backbone=cfg.backbone.name,
        backbone_options=_backbone_options(cfg),
        in_chans=cfg.backbone.in_chans,
        num_target_classes=datamodule.num_target_classes,
        num_source_classes=num_source_classes,
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        _convert_="all",
        _recursive_=False,  # FineTune builds its regularisers itself (plain configs in hparams)
    )
    if on_source:
        source = resolve_source_model(cfg, datamodule)
    if source is not None:
        module.load_source_model(source)
    elif getattr(module, "teacher", None) is not None:
        raise ValueError(
            f"method {cfg.method.name!r} regularises towards a pre-trained model, but none is "
            "given: set backbone.weights=<file or checkpoint>, backbone.pretrained=true (timm's "
            "weights, online) or pretraining.on_source=true"
        )
    if device is not None:  # regularisers' set-up (DELTA's channel estimate) on the run's device
        module.to(device)
    module.setup_regularizers(datamodule)
    return module


def resolve_regularizers(
    names: list[Any], cfg: DictConfig
) -> tuple[float | None, list[dict[str, Any]]]:
    """``method.regularizers``: names of ``conf/regularizer/<name>.yaml`` (or inline configs),
    each merged with ``method.regularizer_options.<name>``. ``mixup`` is not a module: it returns
    its α, which turns on mixup in :class:`~lightning_stl.methods.FineTune`.

    Returns ``(mixup α or None, regulariser configs to instantiate)``.
    """
    folder = Path(_config_dir()) / "regularizer"
    known = sorted(p.stem for p in folder.glob("*.yaml"))
    options = cfg.method.get("regularizer_options") or {}
    mixup_alpha, configs = None, []
    for entry in names:
        if isinstance(entry, DictConfig | dict):
            configs.append(OmegaConf.to_container(OmegaConf.create(entry), resolve=True))
            continue
        name = str(entry)
        if name not in known:
            raise ValueError(
                f"method.regularizers: unknown regulariser {name!r}; known: {', '.join(known)}"
            )
        conf = OmegaConf.merge(OmegaConf.load(folder / f"{name}.yaml"), options.get(name) or {})
        # the file may refer to ${paths.*} (where to cache what it computes)
        context = OmegaConf.create({"paths": OmegaConf.to_container(cfg.paths, resolve=True)})
        context._regularizer = conf
        resolved = OmegaConf.to_container(context, resolve=True)["_regularizer"]
        if name == "mixup":
            mixup_alpha = float(resolved["alpha"])
        else:
            configs.append(resolved)
    return mixup_alpha, configs


def resolve_source_model(cfg: DictConfig, datamodule: SourceTargetDataModule) -> SourceModel | None:
    """The pre-trained model a fine-tuning method starts from, by the first setting that is on:

    1. ``pretraining.on_source``: this project's training on ``data.source`` (cached, see
       :func:`pretrain_on_source`);
    2. ``backbone.weights``: a local file (no network access);
    3. ``backbone.pretrained``: timm's weights for ``backbone.name`` (downloaded when online).

    ``None`` when none is on (fine-tuning from a random initialisation).
    """
    pretraining = cfg.get("pretraining") or {}
    backbone = create_backbone(
        cfg.backbone.name, in_chans=cfg.backbone.in_chans, **_backbone_options(cfg)
    )
    if pretraining.get("on_source"):
        return read_source_model(pretrain_on_source(cfg, datamodule), backbone)
    if cfg.backbone.get("weights"):
        return read_source_model(cfg.backbone.weights, backbone)
    if cfg.backbone.get("pretrained"):
        return download_source_model(cfg.backbone.name, backbone, cfg.backbone.in_chans)
    return None


def pretraining_identity(cfg: DictConfig) -> dict[str, Any]:
    """The settings that decide a source pre-training (its cache key)."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    pretraining = cfg.pretraining
    return _jsonable(
        {
            "source": data.get("source"),
            "source_options": data.get("source_options"),
            "source_batch_size": data.get("source_batch_size"),
            "source_augment": data.get("source_augment"),
            "target": data.get("target"),
            "backbone": OmegaConf.to_container(cfg.backbone, resolve=True),
            "batchnorm": cfg.batchnorm,
            "optimizer": OmegaConf.to_container(
                pretraining.get("optimizer") or cfg.optimizer, resolve=True
            ),
            "epochs": pretraining.epochs,
            "seed": pretraining.seed,
        }
    )


def pretrain_on_source(cfg: DictConfig, datamodule: SourceTargetDataModule) -> Path:
    """Train backbone + source head on ``data.source`` once and return its checkpoint.

    The training is cached in ``pretraining.cache_dir/<source>_<backbone>_<hash of settings>``:
    every later run with the same settings (any seed, N, method) reads its ``last.ckpt``. Runs
    that start together wait for the one that trains (a file lock); a killed pre-training
    resumes from its ``last.ckpt`` like any stage.
    """
    pretraining = cfg.pretraining
    if datamodule.source_spec is None:
        raise ValueError(
            "pretraining.on_source=true needs a source data set, but data.source is null"
        )
    identity = pretraining_identity(cfg)
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(pretraining.cache_dir) / f"{datamodule.source_name}_{cfg.backbone.name}_{digest}"
    check_writable(folder, "pre-training cache folder", "pretraining.cache_dir=...")
    stage_conf = OmegaConf.create(
        {
            "name": "source",
            "epochs": pretraining.epochs,
            "epoch_basis": "source",
            "target_weight": {
                "_target_": "lightning_stl.schedule.ConstantTargetWeight",
                "value": 0.0,
            },
        }
    )
    stage = Stage.from_config(stage_conf)
    with open(folder / "lock", "a+") as lock:
        _lock_saying_who_holds_it(lock, folder)
        done = folder / "checkpoints" / stage.name / STAGE_FILE
        if done.exists():
            path = Path(read_stage_file(done, folder, stage.name)["last_model_path"])
            log.info("source pre-training cached: %s", path)
            return path
        (folder / "settings.json").write_text(json.dumps(identity, indent=1, sort_keys=True))
        log.info("pre-training on the source %s into %s", datamodule.source_name, folder)
        pre_cfg = cfg.copy()
        with open_dict(pre_cfg):
            pre_cfg.seed = int(pretraining.seed)
            pre_cfg.paths.output_dir = str(folder)
            pre_cfg.method.callbacks = None
        L.seed_everything(pre_cfg.seed, workers=True, verbose=False)
        module = build_smooth_transfer(pre_cfg, datamodule, pretraining.get("optimizer"))
        summary = run_stage(pre_cfg, stage, 0, module, datamodule, folder, {})
    if summary["status"] != "ok":
        raise RuntimeError(f"the source pre-training in {folder} diverged: {summary}")
    return Path(summary["last_model_path"])


def _lock_saying_who_holds_it(lock: Any, folder: Path) -> None:
    """``flock`` the open ``lock`` file; while another run holds it, say so (who, since when) and
    wait. The holder's line is written into the file, so the next waiter can name it."""
    import fcntl
    import socket

    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        log.warning(
            "waiting for the source pre-training in %s: %s holds its lock. This run goes on when "
            "that one has finished the pre-training (or was stopped: the lock then frees itself)",
            folder,
            holder,
        )
        fcntl.flock(lock, fcntl.LOCK_EX)
    lock.seek(0)
    lock.truncate()
    lock.write(
        f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
    )
    lock.flush()


def _callbacks(cfg: DictConfig, stage: Stage, checkpoint_dir: Path) -> list[Callback]:
    """``cfg.callbacks`` for ``stage``: checkpoints written into ``checkpoint_dir`` (the best
    one first, as ``trainer.checkpoint_callback``; ``last.ckpt`` is the
    :class:`~lightning_stl.callbacks.ResumeCheckpoint`'s, added with its defaults when the
    config has none), and what monitors validation only where the stage validates."""
    callbacks: list[Callback] = []
    for key, conf in (cfg.get("callbacks") or {}).items():
        if conf is None:
            continue
        target = str(conf.get("_target_", ""))
        monitors_validation = str(conf.get("monitor", "")).startswith("val/")
        if "ProgressBar" in target and not cfg.trainer.get("enable_progress_bar", True):
            continue
        if target.endswith("ResumeCheckpoint"):
            callbacks.append(hydra.utils.instantiate(conf, dirpath=str(checkpoint_dir)))
        elif target.endswith("ModelCheckpoint"):
            # the best is saved when its validation ends (Lightning would wait for the epoch's
            # end when validating once an epoch), so that last.ckpt, written after it, knows it
            overrides: dict[str, Any] = {
                "dirpath": str(checkpoint_dir),
                "save_last": False,
                "save_on_train_epoch_end": False,
            }
            if not stage.validates:
                overrides.update(monitor=None, save_top_k=0)
            callbacks.insert(0, hydra.utils.instantiate(conf, **overrides))
        elif monitors_validation and not stage.validates:
            log.info("stage %s does not validate: callback %s left out", stage.name, key)
        else:
            callbacks.append(hydra.utils.instantiate(conf))
    if not any(
        isinstance(c, ModelCheckpoint) and not isinstance(c, ResumeCheckpoint) for c in callbacks
    ):
        raise ValueError(
            "callbacks.model_checkpoint is required: every run tests its best checkpoint"
        )
    if not any(isinstance(c, ResumeCheckpoint) for c in callbacks):
        callbacks.append(ResumeCheckpoint(dirpath=str(checkpoint_dir)))
    return callbacks


def _method_callbacks(cfg: DictConfig) -> list[Callback]:
    """``method.callbacks``: what the method needs on training time (SMILE's mean teacher)."""
    return [
        hydra.utils.instantiate(conf)
        for conf in (cfg.method.get("callbacks") or {}).values()
        if conf is not None
    ]


def _loggers(cfg: DictConfig, stage: Stage) -> list[Any]:
    loggers = []
    for conf in (cfg.get("logger") or {}).values():
        if conf is not None:
            loggers.append(hydra.utils.instantiate(conf, version=stage.name))
    return loggers


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
    callbacks = _callbacks(cfg, stage, stage_dir)
    if stage.trains_target:
        callbacks += _method_callbacks(cfg)
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
        logger=_loggers(cfg, stage),
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


#: The parts of a config that decide what a run computes (not where it writes or how it shows it).
RUN_IDENTITY = (
    "data",
    "backbone",
    "method",
    "optimizer",
    "epochs",
    "steps",
    "pretraining",
    "seed",
    "batchnorm",
    "val_every_n_steps",
)
_NOT_IDENTITY = {
    "data": ("root", "download", "num_workers", "eval_batch_size"),
    "pretraining": ("cache_dir",),
}


def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """The resolved settings that make two runs the same run."""
    identity = {}
    for key in RUN_IDENTITY:
        value = cfg.get(key)
        if isinstance(value, DictConfig | ListConfig):
            value = OmegaConf.to_container(value, resolve=True)
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in _NOT_IDENTITY.get(key, ())}
        identity[key] = value
    return identity


def check_same_run(run_dir: Path, cfg: DictConfig) -> None:
    """Refuse to resume a run folder that holds a run of other settings."""
    record = run_dir / "run_identity.json"
    identity = _jsonable(run_identity(cfg))
    if not record.exists():
        if rank_zero_only.rank == 0:
            record.write_text(json.dumps(identity, indent=1, sort_keys=True))
        return
    previous = json.loads(record.read_text())
    changed = [k for k in RUN_IDENTITY if previous.get(k) != identity.get(k)]
    if changed:
        raise ValueError(
            f"{run_dir} holds a run with other settings of {', '.join(changed)}; resuming it "
            "would mix two runs. Use a new hydra.run.dir, or delete the folder to start over"
        )


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _jsonable(value: Any) -> Any:
    """``value`` with non-finite floats as the strings "inf", "-inf", "nan" (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


@rank_zero_only
def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(_jsonable(value), indent=1, allow_nan=False))


@rank_zero_only
def _write_run_files(
    run_dir: Path,
    rows: list[tuple[str, int, int, float]],
    stage_starts: list[tuple[str, int]],
    metrics: dict[str, Any],
    title: str,
) -> None:
    """``target_weight.csv``, ``target_weight.png``, ``learning_curve.png`` (when a CSV log was
    written) and ``metrics.json`` (by one process)."""
    with open(run_dir / "target_weight.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["stage", "stage_step", "step", "target_weight"])
        writer.writerows(rows)
    plot_target_weight(
        [r[2] for r in rows],
        [r[3] for r in rows],
        run_dir / "target_weight.png",
        best_step=metrics["best_step"],
        title=title,
    )
    plot_learning_curve(
        learning_curve_series(run_dir, stage_starts),
        run_dir / "learning_curve.png",
        best_step=metrics["best_step"],
        title=title,
    )
    _write_json(run_dir / "metrics.json", metrics)


def _test(
    cfg: DictConfig,
    module: L.LightningModule,
    datamodule: SourceTargetDataModule,
    best: str,
    trainer_overrides: dict[str, Any],
) -> float:
    """Load the best-validation checkpoint into ``module`` and return its target test accuracy."""
    state = read_checkpoint(best, "test the best checkpoint")
    module.load_state_dict(state["state_dict"])
    # the training's progress bar (Lightning would pick its Rich bar for a trainer without one)
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
    results = trainer.test(module, datamodule=datamodule, verbose=False)
    return float(results[0]["test/acc"])


def cross_validate(cfg: DictConfig) -> dict[str, Any]:
    """``data.cv_folds`` = k trainings, fold i validating on the i-th of k stratified folds of the
    training set and training on the others (``data.cv_folds``/``data.cv_fold``), each in
    ``fold<i>/`` of the run folder. Returns the mean of the folds' objectives (``cv.json``).

    SMILE, Section 4.0.2: "a simple three-fold cross validation on the original training set".
    """
    folds = cfg.data.cv_folds
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(
            f"data.cv_folds={folds!r} is not allowed: it must be an integer >= 2, or null"
        )
    run_dir = Path(cfg.paths.output_dir)
    started = time.perf_counter()
    results = []
    for fold in range(folds):
        fold_cfg = cfg.copy()
        with open_dict(fold_cfg):
            fold_cfg.data.cv_fold = fold
            fold_cfg.paths.output_dir = str(run_dir / f"fold{fold}")
        results.append(train(fold_cfg))
    objectives = [float(r["objective"]) for r in results]
    summary = {
        "cv_folds": folds,
        "objective": sum(objectives) / folds,
        "fold_objectives": objectives,
        "status": "ok" if all(r["status"] == "ok" for r in results) else "diverged",
        "best_val_acc": sum(objectives) / folds,
        "wall_time_s": time.perf_counter() - started,
    }
    _write_json(run_dir / "cv.json", summary)
    print(f"{folds}-fold cross-validation accuracy {summary['objective']:.4f}  -> {run_dir}")
    return summary


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train ``cfg.method`` on ``cfg.data`` on a device of its own; see :func:`train_on`."""
    check_run_settings(cfg)
    data = cfg.get("data") or {}
    if data.get("cv_folds") and data.get("cv_fold", 0) is None:
        return cross_validate(cfg)
    pool = cfg.get("device_pool") or {}
    cuda = torch.cuda.device_count()
    if not wants_device_pool(
        cfg.trainer.get("accelerator", "auto"),
        cfg.trainer.get("devices", 1),
        cuda,
        pool.get("enabled", "auto"),
    ):
        return train_on(cfg, {})
    lock_dir = pool.get("lock_dir", "/tmp/lightning_stl_device_locks")
    with claim_device(cuda, lock_dir, names=physical_device_names(cuda)) as index:
        return train_on(cfg, {"accelerator": "gpu", "devices": [index]})


def train_on(cfg: DictConfig, trainer_overrides: dict[str, Any]) -> dict[str, Any]:
    """Train ``cfg.method`` on ``cfg.data`` and write the run's result files.

    Returns the contents of ``metrics.json``. ``objective`` is the best validation accuracy, or
    ``cfg.failure_value`` when the training loss stopped being finite (status ``diverged``).
    """
    started, started_at = time.perf_counter(), time.time()
    quiet_library_noise()
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    run_dir = Path(cfg.paths.output_dir)
    check_writable(run_dir, "run folder", "hydra.run.dir=... (paths.output_dir)")
    if (run_dir / "checkpoints").exists():  # else made, in the writable run folder, by a fit
        check_writable(run_dir / "checkpoints", "checkpoint folder", "hydra.run.dir=...")
    stages = [Stage.from_config(conf) for conf in cfg.method.stages]
    check_same_run(run_dir, cfg)
    if not stages[-1].trains_target:
        raise ValueError(f"method {cfg.method.name!r} must end with a stage that trains the target")
    datamodule: SourceTargetDataModule = hydra.utils.instantiate(cfg.data, _convert_="all")
    has_validation = bool(getattr(datamodule, "has_validation", True))
    for stage in stages:
        stage.validates_target = has_validation
    datamodule.prepare_data()
    datamodule.setup("fit")
    for domain, channels in datamodule.channels().items():
        if channels != cfg.backbone.in_chans:
            name = datamodule.target_name if domain == TARGET else datamodule.source_name
            raise ValueError(
                f"backbone.in_chans={cfg.backbone.in_chans} does not fit the data: {name} (the "
                f"{domain}) has {channels} channel{'s' if channels > 1 else ''}; set "
                f"backbone.in_chans={channels}"
            )
    for stage in stages:
        check_reaches_target(stage, datamodule)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the model's initial weights
    module = build_module(cfg, datamodule, _run_device(cfg, trainer_overrides))

    summaries: list[dict[str, Any]] = []
    finished = [(run_dir / "checkpoints" / s.name / STAGE_FILE).exists() for s in stages]
    for index, stage in enumerate(stages):
        # a finished stage's weights are read only when a stage after it still has to train
        # (a finished run reports from its best checkpoint, without any last.ckpt)
        needed = not all(finished[index + 1 :]) if index + 1 < len(stages) else False
        offset = sum(s["total_steps"] or 0 for s in summaries)
        summaries.append(
            run_stage(
                cfg, stage, index, module, datamodule, run_dir, trainer_overrides, needed, offset
            )
        )
        if summaries[-1]["status"] != "ok":
            break
    final = summaries[-1]
    status = final["status"]
    best_path = None
    if len(summaries) == len(stages):  # without validation, the final model is tested
        best_path = final["best_model_path"] if has_validation else final["last_model_path"]
    test_acc = _test(cfg, module, datamodule, best_path, trainer_overrides) if best_path else None

    offset, rows, stage_starts = 0, [], []
    for summary in summaries:
        stage_starts.append((summary["name"], offset))
        for step, weight in summary["target_weight"]:
            rows.append((summary["name"], step, offset + step, weight))
        offset += summary["total_steps"] or 0
    best_step = None
    if best_path:
        best_step = (offset - (final["total_steps"] or 0)) + final["best_step"]
    metrics = {
        "method": cfg.method.name,
        "status": status,
        "objective": (
            (final["best_val_acc"] if has_validation else test_acc)
            if best_path and status == "ok"
            else float(cfg.get("failure_value", 0.0))
        ),
        "best_val_acc": final["best_val_acc"] if best_path else None,
        "best_step": best_step,
        "test_acc": test_acc,
        "total_steps": offset,
        "target_weight": [s["schedule"] for s in summaries],
        "omega_absolute": _absolute_omega(stages[-1].target_weight, final["total_steps"]),
        "seed": cfg.seed,
        **datamodule.describe(),
        "stages": [{k: v for k, v in s.items() if k != "target_weight"} for s in summaries],
        "device": str(trainer_overrides.get("devices", cfg.trainer.get("accelerator"))),
        "pid": os.getpid(),
        "started_at": started_at,
        "ended_at": time.time(),
        "wall_time_s": time.perf_counter() - started,
    }
    outcome = f"test acc {test_acc:.3f}" if test_acc is not None else status
    _write_run_files(
        run_dir,
        rows,
        stage_starts,
        metrics,
        title=f"{cfg.method.name}: {datamodule.target_name} ← {datamodule.source_name}, "
        f"N={metrics['target_size']}, {outcome}",
    )
    if test_acc is None:
        log.warning(
            "run %s at step %s (loss %s): no checkpoint tested; objective %s",
            status,
            final.get("diverged_at_step"),
            final.get("diverged_loss"),
            metrics["objective"],
        )
        print(f"run {status}: objective {metrics['objective']}  -> {run_dir}")
        return metrics
    if not has_validation:
        print(f"target test accuracy (final model, step {best_step}): {test_acc:.4f}  -> {run_dir}")
        return metrics
    log.info(
        "best validation accuracy %.4f at step %d; test accuracy of that checkpoint %.4f",
        metrics["best_val_acc"],
        best_step,
        test_acc,
    )
    print(
        f"target test accuracy (best-validation checkpoint, step {best_step}): {test_acc:.4f}  "
        f"[val {metrics['best_val_acc']:.4f}]  -> {run_dir}"
    )
    return metrics


def _run_device(cfg: DictConfig, trainer_overrides: dict[str, Any]) -> torch.device:
    """The device the trainer will use (the claimed GPU, the first GPU, or the CPU)."""
    accelerator = str(trainer_overrides.get("accelerator", cfg.trainer.get("accelerator", "auto")))
    devices = trainer_overrides.get("devices", cfg.trainer.get("devices", "auto"))
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        index = devices[0] if isinstance(devices, list | ListConfig) and devices else 0
        return torch.device(f"cuda:{int(index)}")
    return torch.device("cpu")


def _absolute_omega(
    schedule: TargetWeightSchedule, total_steps: int | None
) -> dict[str, float] | None:
    absolute = getattr(schedule, "absolute", None)
    if absolute is None or not total_steps:
        return None
    t0, tau, alpha = absolute(total_steps)
    return {"t0": t0, "tau": tau, "alpha": alpha}


def compose_config(
    overrides: list[str], output_dir: str | Path, data_dir: str | Path | None = None
) -> DictConfig:
    """``conf/config.yaml`` with ``overrides``, writing into ``output_dir``, outside ``hydra.main``.

    For scripts and tests that call :func:`train` in-process (no Hydra run folder, no chdir).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=_config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        if data_dir is not None:
            cfg.paths.data_dir = str(data_dir)
    return cfg


@hydra.main(version_base="1.3", config_path=_config_dir(), config_name="config")
def main(cfg: DictConfig) -> float:
    """Train, test the best-validation checkpoint, and return its validation accuracy.

    A run that diverged returns ``failure_value`` (0 by default): a finite worst value that an
    Optuna sweep records instead of crashing on NaN.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    strategy = str(cfg.trainer.get("strategy", "auto"))
    if strategy.startswith("ddp") and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise ValueError(
            f"trainer.strategy={strategy} inside a multirun: Lightning's DDP re-launches the "
            "command line, which would start the whole sweep again in every process. Run DDP "
            "trials as single runs (one job each, e.g. hydra/launcher=slurm with several GPUs "
            "per task is not supported either), or search with one device per trial"
        )
    single_run = HydraConfig.get().mode == RunMode.RUN
    try:
        metrics = train(cfg)
    except Exception as error:
        # an error once training has begun is not one of the input: it keeps its traceback
        message = None if training_started() else user_message(error)
        if message is None or not single_run:  # a sweep records it as the trial's failure
            raise
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    if metrics["status"] != "ok" and single_run:
        # a single run that diverged must not look like a success (a sweep records the value)
        print(
            f"error: the run {metrics['status']} at step "
            f"{metrics['stages'][-1].get('diverged_at_step')} (loss "
            f"{metrics['stages'][-1].get('diverged_loss')}): its test accuracy is not a result. "
            "Lower optimizer.lr or check the data",
            file=sys.stderr,
        )
        raise SystemExit(1)
    return float(metrics["objective"])


if __name__ == "__main__":
    main()
