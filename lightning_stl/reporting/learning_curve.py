"""A run's learning curves: training loss and target-validation accuracy against the step.

Read from Lightning's CSV logs (``<run dir>/csv/<stage>/metrics.csv``, one per stage, whose
steps count from 0 in every stage) and drawn on the run's step axis, stages one after another,
with the best-validation step dashed as in ``target_weight.png``.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lightning_stl.reporting.target_weight_plot import save_figure  # noqa: E402

#: The logged columns that are drawn: (column, label, axis).
CURVES = (
    ("train/loss", "training loss", "loss"),
    ("val/loss", "validation loss", "loss"),
    ("val/acc", "validation accuracy", "acc"),
)


def learning_curve_series(
    run_dir: Path, stages: Sequence[tuple[str, int]]
) -> dict[str, list[tuple[int, float]]]:
    """``{column: [(run step, value), ...]}`` of :data:`CURVES` for ``stages`` = ``[(name, first
    step of the stage on the run's axis), ...]``; stages without a CSV log are skipped."""
    series: dict[str, list[tuple[int, float]]] = {column: [] for column, _, _ in CURVES}
    for name, offset in stages:
        path = run_dir / "csv" / name / "metrics.csv"
        if not path.is_file():
            continue
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                # Lightning writes the 0-based index of the step (global_step − 1 after it);
                # the run's axis, like target_weight.csv and best_step, counts steps from 1
                step = offset + int(row["step"]) + 1
                for column in series:
                    if row.get(column) not in (None, ""):
                        series[column].append((step, float(row[column])))
    return series


def plot_learning_curve(
    series: dict[str, list[tuple[int, float]]],
    path: str | Path,
    best_step: int | None = None,
    title: str | None = None,
) -> Path | None:
    """Losses (left axis) and validation accuracy (right axis) against the step; ``None`` (no
    file) when nothing was logged."""
    if not any(series.values()):
        return None
    fig, loss_axis = plt.subplots(figsize=(5.6, 3.4), dpi=120)
    acc_axis = loss_axis.twinx()
    colours = {"train/loss": "tab:gray", "val/loss": "tab:orange", "val/acc": "tab:green"}
    for column, label, axis in CURVES:
        points = series.get(column) or []
        if points:
            xs, ys = zip(*points, strict=True)
            target = loss_axis if axis == "loss" else acc_axis
            style = {"marker": "o", "ms": 3} if column.startswith("val/") else {}
            target.plot(xs, ys, color=colours[column], lw=1.4, label=label, **style)
    if best_step is not None:
        loss_axis.axvline(best_step, color="tab:blue", ls="--", lw=1.2, label="best validation")
    last = max(x for points in series.values() for x, _ in points)
    loss_axis.set_xlim(0, max(1, last))
    loss_axis.set_xlabel("optimiser step")
    loss_axis.set_ylabel("loss")
    acc_axis.set_ylabel("validation accuracy")
    acc_axis.set_ylim(0, 1)
    if title:
        loss_axis.set_title(title, fontsize=9)
    handles = [h for axis in (loss_axis, acc_axis) for h in axis.get_legend_handles_labels()[0]]
    loss_axis.legend(handles=handles, loc="center right", fontsize=7)
    loss_axis.grid(alpha=0.3)
    return save_figure(fig, path)
