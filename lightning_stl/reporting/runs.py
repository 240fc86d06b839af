"""The finished runs of a reproduction, one per table cell and seed: their rows in ``runs.csv``
and the progress line printed as a cell's seeds finish."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_stl.reporting.tables import write_csv_rows

#: The values of a run's ``metrics.json`` that its row of ``runs.csv`` keeps.
RESULT_KEYS = ("test_acc", "best_val_acc", "best_step", "total_steps", "wall_time_s")


def run_row(metrics: Mapping[str, Any], run_dir: Path, **keys: Any) -> dict[str, Any]:
    """The row of one finished run: ``keys`` (the cell and seed, in order), its results
    (:data:`RESULT_KEYS`) and its folder."""
    return {**keys, **{key: metrics[key] for key in RESULT_KEYS}, "run_dir": str(run_dir)}


def write_runs_csv(rows: Sequence[Mapping[str, Any]], path: Path, root: Path) -> None:
    """``runs.csv``: the rows, with run folders relative to ``root`` (the project's folder)."""
    write_csv_rows([{**r, "run_dir": os.path.relpath(r["run_dir"], root)} for r in rows], path)


def print_cell(name: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """``[HH:MM:SS] <name>: <test accuracy (%) of each run>``, ``diverged`` for a run without."""
    accuracies = (
        f"{100 * r['test_acc']:.1f}" if r["test_acc"] is not None else "diverged" for r in rows
    )
    print(f"[{time.strftime('%H:%M:%S')}] {name}: " + ", ".join(accuracies), flush=True)
