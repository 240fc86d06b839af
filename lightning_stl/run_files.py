"""A run folder's identity and result files: ``run_identity.json`` (a resume with other
settings is refused), ``metrics.json``, ``target_weight.csv`` / ``.png`` and ``learning_curve.png``."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, ListConfig, OmegaConf

from lightning_stl.reporting.learning_curve import learning_curve_series, plot_learning_curve
from lightning_stl.reporting.target_weight_plot import plot_target_weight
from lightning_stl.schedule import TargetWeightSchedule

log = logging.getLogger(__name__)

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
    "run_fraction",
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
    trainer = cfg.get("trainer") or {}
    # Trainer settings that decide which steps a run takes and validates (run_fraction follows them)
    identity["trainer_steps"] = {
        key: trainer.get(key) for key in ("accumulate_grad_batches", "val_check_interval")
    }
    return identity


def check_same_run(run_dir: Path, cfg: DictConfig, resolved: dict[str, Any] | None = None) -> None:
    """Refuse to resume a run folder that holds a run of other settings: those of
    :data:`RUN_IDENTITY` and the ``resolved`` ones that depend on the device (the fast mode's
    ``precision`` and ``channels_last``). A key that an older record predates is not compared,
    so folders written before it was part of the identity still resume."""
    record = run_dir / "run_identity.json"
    identity = _jsonable({**run_identity(cfg), **(resolved or {})})
    if not record.exists():
        if rank_zero_only.rank == 0:
            record.write_text(json.dumps(identity, indent=1, sort_keys=True))
        return
    previous = json.loads(record.read_text())
    changed = [k for k in identity if k in previous and previous[k] != identity[k]]
    if not changed and set(identity) - set(previous) and rank_zero_only.rank == 0:
        # an older record: from now on the keys it lacked are checked too
        record.write_text(json.dumps({**previous, **identity}, indent=1, sort_keys=True))
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


def report_run(
    cfg: DictConfig,
    stages: list[Any],
    summaries: list[dict[str, Any]],
    datamodule: Any,
    test_acc: float | None,
    tested: str | None,
    has_validation: bool,
    device: str,
    started: tuple[float, ...],
    speed: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``metrics.json`` and the run's figures from its stage summaries, and the run's last line.

    ``tested`` is the checkpoint whose ``test_acc`` was measured (``None``: none, the run
    diverged); ``started`` is ``(time.perf_counter(), time.time(), time.process_time())`` at the run's
    start;
    ``speed`` what :func:`lightning_stl.speed.speed_settings` decided.
    Returns the contents of ``metrics.json``.
    """
    final = summaries[-1]
    status = final["status"]
    run_dir = Path(cfg.paths.output_dir)
    offset, rows, stage_starts = 0, [], []
    for summary in summaries:
        stage_starts.append((summary["name"], offset))
        for step, weight in summary["target_weight"]:
            rows.append((summary["name"], step, offset + step, weight))
        offset += summary["total_steps"] or 0
    best_step = None
    if tested:
        best_step = (offset - (final["total_steps"] or 0)) + final["best_step"]
    metrics = {
        "method": cfg.method.name,
        "status": status,
        "objective": (
            (final["best_val_acc"] if has_validation else test_acc)
            if tested and status == "ok"
            else float(cfg.get("failure_value", 0.0))
        ),
        "best_val_acc": final["best_val_acc"] if tested else None,
        "best_step": best_step,
        "test_acc": test_acc,
        "total_steps": offset,
        "target_weight": [s["schedule"] for s in summaries],
        "omega_absolute": _absolute_omega(stages[-1].target_weight, final["total_steps"]),
        "seed": cfg.seed,
        **datamodule.describe(),
        "stages": [{k: v for k, v in s.items() if k != "target_weight"} for s in summaries],
        "device": device,
        "speed": speed or {},
        "run_fraction": float(cfg.get("run_fraction", 1.0)),
        "pid": os.getpid(),
        "started_at": started[1],
        "ended_at": time.time(),
        "wall_time_s": time.perf_counter() - started[0],
        # CPU-seconds of every thread of this process (what a search on shared cores spends)
        "cpu_time_s": time.process_time() - started[2] if len(started) > 2 else None,
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


def _absolute_omega(
    schedule: TargetWeightSchedule, total_steps: int | None
) -> dict[str, float] | None:
    absolute = getattr(schedule, "absolute", None)
    if absolute is None or not total_steps:
        return None
    t0, tau, alpha = absolute(total_steps)
    return {"t0": t0, "tau": tau, "alpha": alpha}
