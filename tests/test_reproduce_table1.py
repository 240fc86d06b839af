"""`make reproduce-table1` end to end on a seconds-long profile, and its resumption."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib

from tests.figure_pixels import AxesBox, assert_curve_through, colour_mask, read_rgb, vertical_lines

ROOT = Path(__file__).resolve().parents[1]


def reproduce(script: str, tmp_path: Path, data_dir: Path) -> subprocess.CompletedProcess:
    """``python experiments/<script>`` on the digits smoke profile, its run folders under
    ``tmp_path/work`` and its tables under ``tmp_path/results``; it must succeed."""
    command = [
        sys.executable,
        f"experiments/{script}",
        "--experiment=digits",
        "--profile=smoke",
        f"--work={tmp_path / 'work'}",
        f"--out={tmp_path / 'results'}",
        f"--data={data_dir}",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def read_runs(out: Path) -> list[dict[str, str]]:
    """The rows of ``out/runs.csv``, each checked to be the result its run folder holds."""
    runs = list(csv.DictReader((out / "runs.csv").open()))
    for run in runs:
        written = json.loads((ROOT / run["run_dir"] / "metrics.json").read_text())
        assert float(run["test_acc"]) == written["test_acc"] and int(run["seed"]) == written["seed"]
    return runs


def test_reproduction_writes_table_and_figure_and_resumes(tmp_path, data_dir):
    out = tmp_path / "results"
    reproduce("reproduce_table1.py", tmp_path, data_dir)
    table = (out / "table1.md").read_text()
    assert "| N | Target | Fine-tune | Multi-task | Ours |" in table
    runs = read_runs(out)
    assert sorted({r["method"] for r in runs}) == ["finetune", "multitask", "smooth", "target_only"]
    assert len(runs) == 8  # 4 methods x 2 seeds

    # the row of N = 30: mean ± std (%) over the seeds of each column's runs, recomputed here,
    # and the best mean (ties included) in bold
    row = next(line for line in table.splitlines() if line.startswith("| 30 |"))
    cells = [c.strip() for c in row.strip().strip("|").split("|")]
    assert len(cells) == 5
    means, bold = {}, {}
    methods = ("target_only", "finetune", "multitask", "smooth")
    for method, cell in zip(methods, cells[1:], strict=True):
        accs = [100 * float(r["test_acc"]) for r in runs if r["method"] == method]
        means[method], std = statistics.mean(accs), statistics.stdev(accs)
        bold[method] = cell.startswith("**") and cell.endswith("**")
        shown_mean, shown_std = (float(v) for v in cell.strip("*").split("±"))
        assert abs(shown_mean - means[method]) <= 0.05 + 1e-9, (method, cell, accs)
        assert abs(shown_std - std) <= 0.05 + 1e-9, (method, cell, accs)
    best = max(means.values())
    assert bold == {m: mean >= best - 1e-9 for m, mean in means.items()}, (means, row)

    # Figure 2: the λ(t) of Ours (first seed) for the one N, in viridis' first colour, x from the
    # first to the last step with matplotlib's 5% margins, y from -0.03 to 1.03; its best step
    # as a dashed vertical line of the same colour
    ours = ROOT / next(r["run_dir"] for r in runs if r["method"] == "smooth" and r["seed"] == "0")
    with (ours / "target_weight.csv").open() as handle:
        points = [(int(r["step"]), float(r["target_weight"])) for r in csv.DictReader(handle)]
    best_step = json.loads((ours / "metrics.json").read_text())["best_step"]
    rgb = read_rgb(out / "figure2.png")
    box = AxesBox.find(rgb)
    first, last = points[0][0], points[-1][0]
    xlim = (first - 0.05 * (last - first), last + 0.05 * (last - first))
    curve = box.inside(colour_mask(rgb, matplotlib.colormaps["viridis"](0.0)))
    assert_curve_through(curve, box, points, xlim, (-0.03, 1.03))
    (best_line,) = vertical_lines(curve, box)
    assert abs(best_line - box.column(best_step, xlim)) <= 2
    best = (out / "best_params.json").read_text()
    assert "method.target_weight.tau" in best and "method.weight" in best
    stamps = {p: p.stat().st_mtime for p in tmp_path.rglob("metrics.json")}

    second = reproduce("reproduce_table1.py", tmp_path, data_dir)
    # nothing finished was run again
    assert {p: p.stat().st_mtime for p in tmp_path.rglob("metrics.json")} == stamps
    assert "trials" not in second.stdout  # no search was started again
