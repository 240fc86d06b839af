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

import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig

from lightning_stl.checkpoint_io import check_writable
from lightning_stl.config_files import _config_dir, compose_config
from lightning_stl.cross_validation import cross_validate
from lightning_stl.data import SourceTargetDataModule
from lightning_stl.devices import (
    claim_device,
    free_device_memory,
    physical_device_names,
    training_device,
    wants_device_pool,
)
from lightning_stl.errors import training_started, user_message
from lightning_stl.method_module import build_module
from lightning_stl.quiet import quiet_library_noise
from lightning_stl.run_files import check_same_run, report_run
from lightning_stl.settings_check import (
    check_backbone_fits_data,
    check_run_settings,
    check_strategy_fits_mode,
)
from lightning_stl.speed import compile_models, speed_settings, to_channels_last
from lightning_stl.stages import (
    STAGE_FILE,
    Stage,
    check_stage,
    measure_test_accuracy,
    run_stage,
)

log = logging.getLogger(__name__)

__all__ = ["compose_config", "main", "train", "train_on"]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train ``cfg.method`` on ``cfg.data`` on a device of its own; see :func:`train_on`."""
    check_run_settings(cfg)
    data = cfg.get("data") or {}
    if data.get("cv_folds") and data.get("cv_fold", 0) is None:
        return cross_validate(cfg, train)
    pool = cfg.get("device_pool") or {}
    cuda = torch.cuda.device_count()
    per_device = pool.get("trials_per_device", 1)
    if not wants_device_pool(
        cfg.trainer.get("accelerator", "auto"),
        cfg.trainer.get("devices", 1),
        cuda,
        pool.get("enabled", "auto"),
        per_device,
    ):
        return train_on(cfg, {})
    with claim_device(
        cuda,
        pool.get("lock_dir", "/tmp/lightning_stl_device_locks"),
        names=physical_device_names(cuda),
        trials_per_device=per_device,
        free_memory=free_device_memory,
        min_free_bytes=float(pool.get("min_free_memory_gb", 0.0)) * 2**30,
    ) as index:
        return train_on(cfg, {"accelerator": "gpu", "devices": [index]})


def train_on(cfg: DictConfig, trainer_overrides: dict[str, Any]) -> dict[str, Any]:
    """Train ``cfg.method`` on ``cfg.data`` and write the run's result files.

    Returns the contents of ``metrics.json``. ``objective`` is the best validation accuracy, or
    ``cfg.failure_value`` when the training loss stopped being finite (status ``diverged``).
    """
    started, started_at, cpu_started = time.perf_counter(), time.time(), time.process_time()
    quiet_library_noise()
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    run_dir = Path(cfg.paths.output_dir)
    check_writable(run_dir, "run folder", "hydra.run.dir=... (paths.output_dir)")
    if (run_dir / "checkpoints").exists():  # else made, in the writable run folder, by a fit
        check_writable(run_dir / "checkpoints", "checkpoint folder", "hydra.run.dir=...")
    stages = [Stage.from_config(conf) for conf in cfg.method.stages]
    device = training_device(cfg, trainer_overrides)
    speed = speed_settings(cfg, device)
    check_same_run(run_dir, cfg, {k: speed[k] for k in ("precision", "channels_last")})
    trainer_overrides = {**trainer_overrides, "precision": speed["precision"]}
    if not stages[-1].trains_target:
        raise ValueError(f"method {cfg.method.name!r} must end with a stage that trains the target")
    datamodule: SourceTargetDataModule = hydra.utils.instantiate(cfg.data, _convert_="all")
    has_validation = bool(getattr(datamodule, "has_validation", True))
    for stage in stages:
        stage.validates_target = has_validation
    datamodule.prepare_data()
    datamodule.setup("fit")
    check_backbone_fits_data(cfg, datamodule)
    for stage in stages:
        check_stage(cfg, stage, datamodule)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the model's initial weights
    module = build_module(cfg, datamodule, device)
    if speed["channels_last"]:
        to_channels_last(module)
    if speed["compile"]:
        compile_models(module, cfg.speed.get("compile_cache_dir"))

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
    best_path = None
    if len(summaries) == len(stages):  # without validation, the final model is tested
        best_path = final["best_model_path"] if has_validation else final["last_model_path"]
    test_acc = None
    if best_path:
        test_acc = measure_test_accuracy(cfg, module, datamodule, best_path, trainer_overrides)

    return report_run(
        cfg,
        stages,
        summaries,
        datamodule,
        test_acc,
        tested=best_path,
        has_validation=has_validation,
        device=str(trainer_overrides.get("devices", cfg.trainer.get("accelerator"))),
        started=(started, started_at, cpu_started),
        speed=speed,
    )


@hydra.main(version_base="1.3", config_path=_config_dir(), config_name="config")
def main(cfg: DictConfig) -> float:
    """Train, test the best-validation checkpoint, and return its validation accuracy.

    A run that diverged returns ``failure_value`` (0 by default): a finite worst value that an
    Optuna sweep records instead of crashing on NaN.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    single_run = HydraConfig.get().mode == RunMode.RUN
    check_strategy_fits_mode(str(cfg.trainer.get("strategy", "auto")), multirun=not single_run)
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
