"""The pre-trained source model a fine-tuning method starts from: this project's training on
the source (cached and locked, shared by every run with the same settings), a local file, or
timm's weights."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_stl.building import _backbone_options, build_smooth_transfer
from lightning_stl.checkpoint_io import check_writable
from lightning_stl.data import SourceTargetDataModule
from lightning_stl.models.registry import create_backbone
from lightning_stl.models.source_model import SourceModel, download_source_model, read_source_model
from lightning_stl.run_files import _jsonable
from lightning_stl.stages import STAGE_FILE, Stage, read_stage_file, run_stage

log = logging.getLogger(__name__)


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
            pre_cfg.run_fraction = 1.0  # the cached source model is the same for every fidelity
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
