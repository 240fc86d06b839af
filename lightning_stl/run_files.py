"""A run folder's identity and result files: ``run_identity.json`` (a resume with other
settings is refused), ``metrics.json``, ``target_weight.csv`` / ``.png`` and ``learning_curve.png``."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, ListConfig, OmegaConf

from lightning_stl.reporting.learning_curve import learning_curve_series, plot_learning_curve
from lightning_stl.reporting.target_weight_plot import plot_target_weight

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
