"""The report of a durable Optuna sweep (:mod:`lightning_stl.sweeper`), rewritten after every
batch in the sweep folder: ``trials.csv`` (one row per trial: parameters, user attributes such as
validation and test accuracy, status, wall time and run folder), ``best.yaml`` (the best
parameters) and ``trials.png`` (the objective by trial and the best so far)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from omegaconf import OmegaConf
from optuna.trial import TrialState


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One flat dict per trial of ``study``, in trial order."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {"trial": t.number, "state": t.state.name, "value": t.value}
        row.update({f"param.{k}": v for k, v in t.params.items()})
        row.update({k: v for k, v in t.user_attrs.items()})
        rows.append(row)
    return rows


def write_report(study: optuna.Study, folder: Path, direction: str) -> None:
    """``trials.csv``, ``best.yaml`` and ``trials.png`` of ``study`` into ``folder``."""
    rows = trial_rows(study)
    if not rows:
        return
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    tmp = folder / "trials.csv.tmp"
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fields)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(folder / "trials.csv")
    completed = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not completed:
        return
    best = study.best_trial
    OmegaConf.save(
        OmegaConf.create(
            {
                "best_value": best.value,
                "best_trial": best.number,
                "best_params": dict(best.params),
                "best_test_acc": best.user_attrs.get("test_acc"),
                "n_trials": len(rows),
                "n_complete": len(completed),
            }
        ),
        folder / "best.yaml",
    )
    plot_trials([(t.number, t.value) for t in completed], folder / "trials.png", direction)


def plot_trials(points: Sequence[tuple[int, float]], path: Path, direction: str) -> None:
    """Objective by trial number, with the best-so-far curve."""
    import matplotlib

    matplotlib.use("Agg")  # imported when drawn: the sweeper is imported by every Hydra start-up
    import matplotlib.pyplot as plt

    from lightning_stl.reporting.target_weight_plot import save_figure

    points = sorted(points)
    numbers = [n for n, _ in points]
    values = [v for _, v in points]
    best, running = [], None
    for v in values:
        running = (
            v
            if running is None
            else (max(running, v) if direction == "maximize" else min(running, v))
        )
        best.append(running)
    fig, ax = plt.subplots(figsize=(6.5, 3.2), dpi=120)
    ax.scatter(numbers, values, s=12, color="tab:gray", label="trial")
    ax.step(numbers, best, where="post", color="tab:red", lw=1.6, label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("objective (validation accuracy)")
    ax.grid(alpha=0.3)
    # beside the axes, where it can hide no trial
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    save_figure(fig, path)
