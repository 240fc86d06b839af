"""The table of ``python -m lightning_stl.interpolation``: SMILE's Table 6 layout, a row per run,
Label-IL then Feature-IL, each on the run's training images and its test set."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from lightning_stl.reporting.tables import markdown_table

if TYPE_CHECKING:
    from lightning_stl.finished_run import RunFolder

SPLITS = ("train", "test")
#: Result keys of :func:`lightning_stl.interpolation.interpolation_losses` and the table's
#: column order.
COLUMNS = (("label_il", "Label-IL"), ("feature_il", "Feature-IL"))
#: The four losses of a run (``label_il_train`` ...), in the table's column order.
LOSS_KEYS = tuple(f"{key}_{split}" for key, _ in COLUMNS for split in SPLITS)


def loss_values(row: dict) -> list[float]:
    """The four interpolation losses of a row, in the table's column order."""
    return [row[key] for key in LOSS_KEYS]


def table_rows(runs: Sequence[RunFolder], values: Sequence[dict[str, float]]) -> list[dict]:
    """One row per run: its label (with the folder's name when two labels are the same),
    settings and the four interpolation losses."""
    labels = [run.label for run in runs]
    rows = []
    for run, label, value in zip(runs, labels, values, strict=True):
        m = run.metrics
        rows.append(
            {
                "run": label if labels.count(label) == 1 else f"{label} ({run.path.name})",
                "method": m.get("method"),
                "target_size": m.get("target_size"),
                "seed": m.get("seed"),
                "test_acc": m.get("test_acc"),
                "checkpoint": str(run.checkpoint),
                **{key: value[key] for key in LOSS_KEYS},
            }
        )
    return rows


def table_markdown(rows: Sequence[dict], digits: int = 4) -> str:
    """SMILE's Table 6 layout: a row per run; Label-IL then Feature-IL, each Train and Test."""
    header = ["Run"] + [f"{name} {split.capitalize()}" for _, name in COLUMNS for split in SPLITS]
    cells = [[row["run"], *(f"{v:.{digits}f}" for v in loss_values(row))] for row in rows]
    return markdown_table(header, cells)
