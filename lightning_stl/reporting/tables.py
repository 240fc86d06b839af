"""Result tables: test accuracy as mean ± std over seeds, paired differences with their confidence
intervals, Markdown tables and CSV files.

Shared by the reproductions (``experiments/reproduce_table1.py``, ``reproduce_smile.py``,
``transfer_gap.py``) and ``python -m lightning_stl.interpolation``.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: (mean, sample standard deviation, number of values): the standard deviation is 0 for one value.
Stat = tuple[float, float, int]


def mean_std(values: Sequence[float]) -> Stat:
    """Mean, sample standard deviation (0 for a single value) and count of ``values``."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.mean(values), std, len(values)


def paired_difference(
    first: Sequence[float], second: Sequence[float], level: float = 0.95
) -> tuple[float, float, float, int]:
    """The mean of ``second[i] - first[i]`` and its paired-t confidence interval at ``level``:
    ``(mean, low, high, n)``, from the pairs' differences d: mean(d) ± t_{n-1} · sd(d) / √n.
    One pair gives an interval of ±inf."""
    from scipy.stats import t as student_t

    if len(first) != len(second) or not first:
        raise ValueError(f"paired values must be as many, got {len(first)} and {len(second)}")
    differences = [b - a for a, b in zip(first, second, strict=True)]
    mean, sd, n = mean_std(differences)
    if n < 2:
        return mean, -math.inf, math.inf, n
    half = float(student_t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half, n


def accuracy_stats(rows: Sequence[Mapping[str, Any]], **where: Any) -> Stat | None:
    """Mean ± std of the test accuracy, in %, of the ``rows`` whose keys have the values
    ``where`` gives (a run that diverged, ``test_acc`` None, is left out); None without one."""
    accs = [
        100 * float(r["test_acc"])
        for r in rows
        if all(r[key] == value for key, value in where.items()) and r["test_acc"] is not None
    ]
    return mean_std(accs) if accs else None


def stat_cells(stat: Stat | None, best: float | None, digits: int) -> tuple[str, str]:
    """The Markdown cell of ``stat`` (``mean ± std`` to ``digits`` places, bold when the mean is
    ``best``) and its CSV cell (``mean±std`` to 2 places); ``…`` and an empty cell without it."""
    if stat is None:
        return "…", ""
    mean, std, _ = stat
    text = f"{mean:.{digits}f} ± {std:.{digits}f}"
    return (f"**{text}**" if mean == best else text), f"{mean:.2f}±{std:.2f}"


def markdown_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], first_align: str = "---"
) -> str:
    """A Markdown table: the first column aligned by ``first_align`` (``---``, ``:---`` or
    ``---:``), the others right-aligned."""
    lines = [_markdown_row(header), f"|{first_align}|" + "---:|" * (len(header) - 1)]
    lines += [_markdown_row(row) for row in rows]
    return "\n".join(lines) + "\n"


def _markdown_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def write_table(
    stem: Path, caption: str, command: str, markdown: str, cells: Sequence[Sequence[str]]
) -> None:
    """``<stem>.md``: the caption, the command that made the table and the Markdown table;
    ``<stem>.csv``: ``cells``, a row a line."""
    stem.with_suffix(".md").write_text(f"{caption}\nMade by `{command}`.\n\n" + markdown)
    with stem.with_suffix(".csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(cells)


def write_csv_rows(rows: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """``rows`` as CSV under a header of the first row's keys (an empty header without rows)."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)
