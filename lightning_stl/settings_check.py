"""Checks of a run's top-level settings, made before anything is built or trained.

The data, model, optimiser and callbacks check their own arguments when Hydra instantiates
them; what is checked here belongs to no class: the seed, the run length (``epochs.*``,
``steps.*``), ``torch_threads``, ``val_every_n_steps``, ``run_fraction``, ``failure_value``, the trainer keys that
the project sets itself, and keys that nothing reads (a misspelt ``+method.`` key, the
``regularizer`` group selected on its own). Each failure is one ``ValueError`` that names the
setting, its value and what is allowed (:mod:`lightning_stl.errors`).
"""

from __future__ import annotations

import difflib
import math
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig

from lightning_stl.checks import integer
from lightning_stl.run_fraction import check_run_fraction

#: Trainer arguments that each stage sets from the project's own settings.
TRAINER_KEYS_SET_BY_STAGES = {
    "max_epochs": "epochs.joint, epochs.source, epochs.target",
    "min_epochs": "epochs.joint, epochs.source, epochs.target",
    "max_steps": "steps.finetune (SMILE's iterations)",
    "min_steps": "steps.finetune (SMILE's iterations)",
    "callbacks": "the callbacks group (callbacks=..., +callbacks.<name>=...)",
    "logger": "the logger group (logger=csv, logger=tensorboard)",
    "plugins": "nothing: checkpoints are written by lightning_stl.checkpoint_io",
    "default_root_dir": "hydra.run.dir (paths.output_dir)",
}

SEED_RANGE = (0, 2**32 - 1)  # numpy's and scikit-learn's seeds


def check_run_settings(cfg: DictConfig) -> None:
    """Raise ``ValueError`` for the first top-level setting of ``cfg`` that is not allowed."""
    _integer(cfg, "seed", low=SEED_RANGE[0], high=SEED_RANGE[1])
    if "pretraining" in cfg and cfg.pretraining is not None:
        _integer(cfg.pretraining, "seed", "pretraining.seed", low=SEED_RANGE[0], high=SEED_RANGE[1])
    for name in cfg.get("epochs") or {}:
        _integer(cfg.epochs, name, f"epochs.{name}", low=1)
    for name in cfg.get("steps") or {}:
        _integer(cfg.steps, name, f"steps.{name}", low=1, null=True, also="null")
    _integer(cfg, "torch_threads", low=1, null=True, also="null (torch's default)")
    _integer(cfg, "val_every_n_steps", low=1, null=True, also="null (every epoch)")
    if "run_fraction" in cfg:
        check_run_fraction(cfg.run_fraction)
    value = cfg.get("failure_value", 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(
            f"failure_value={value} is not allowed: it must be a finite number (the objective "
            "a diverged run reports to a sweeper, e.g. 0.0)"
        )
    for key in cfg.get("trainer") or {}:
        if key in TRAINER_KEYS_SET_BY_STAGES:
            raise ValueError(
                f"trainer.{key}={cfg.trainer[key]} is not used: each stage sets it from "
                f"{TRAINER_KEYS_SET_BY_STAGES[key]}; set that instead"
            )
    if cfg.get("regularizer") is not None:
        raise ValueError(
            "regularizer=... (the regularizer config group) selects nothing on its own: a "
            "method's regularisers are chosen with method.regularizers=[l2sp, ...] or a method "
            "that has them (method=l2sp, method=delta, ...); see conf/regularizer/"
        )
    unknown = sorted(set(cfg.method) - known_method_keys())
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, sorted(known_method_keys()), n=1)
        hint = f"; did you mean method.{close[0]}?" if close else ""
        raise ValueError(
            f"method.{key} is not a setting of any method{hint} A method's settings are "
            f"{', '.join(sorted(known_method_keys()))}"
        )


@cache
def known_method_keys() -> frozenset[str]:
    """The keys that some ``conf/method/*.yaml`` sets (what the entry point reads of a method)."""
    from lightning_stl.config_files import _config_dir

    keys: set[str] = set()
    for path in Path(_config_dir(), "method").glob("*.yaml"):
        keys |= set(yaml.safe_load(path.read_text()) or {}) - {"defaults"}
    return frozenset(keys)


def _integer(node: Any, key: str, name: str | None = None, **limits: Any) -> None:
    """``node[key]`` must be an integer (see :func:`lightning_stl.checks.integer`)."""
    value = node.get(key) if isinstance(node, DictConfig) else None
    integer(name or key, value, **limits)


def check_backbone_fits_data(cfg: DictConfig, datamodule: Any) -> None:
    """``backbone.in_chans`` must be the channel count of every training set (after setup)."""
    for domain, channels in datamodule.channels().items():
        if channels != cfg.backbone.in_chans:
            name = datamodule.target_name if domain == "target" else datamodule.source_name
            raise ValueError(
                f"backbone.in_chans={cfg.backbone.in_chans} does not fit the data: {name} (the "
                f"{domain}) has {channels} channel{'s' if channels > 1 else ''}; set "
                f"backbone.in_chans={channels}"
            )


def check_strategy_fits_mode(strategy: str, multirun: bool) -> None:
    """No DDP inside a multirun: Lightning's DDP re-launches the command line, which would start
    the whole sweep again in every process."""
    if strategy.startswith("ddp") and multirun:
        raise ValueError(
            f"trainer.strategy={strategy} inside a multirun: Lightning's DDP re-launches the "
            "command line, which would start the whole sweep again in every process. Run DDP "
            "trials as single runs (one job each, e.g. hydra/launcher=slurm with several GPUs "
            "per task is not supported either), or search with one device per trial"
        )
