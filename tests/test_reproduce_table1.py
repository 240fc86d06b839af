"""`make reproduce-table1` end to end on a seconds-long profile, and its resumption."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_reproduction_writes_table_and_figure_and_resumes(tmp_path, data_dir):
    out = tmp_path / "results"
    command = [
        sys.executable,
        "experiments/reproduce_table1.py",
        "--experiment=digits",
        "--profile=smoke",
        f"--work={tmp_path / 'work'}",
        f"--out={out}",
        f"--data={data_dir}",
    ]
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    table = (out / "table1.md").read_text()
    assert "| N | Target | Fine-tune | Multi-task | Ours |" in table
    row = next(line for line in table.splitlines() if line.startswith("| 30 |"))
    assert row.count("±") == 4 and row.count("**") >= 2  # the best cell(s) of the row in bold
    runs = list(csv.DictReader((out / "runs.csv").open()))
    assert sorted({r["method"] for r in runs}) == ["finetune", "multitask", "smooth", "target_only"]
    assert len(runs) == 8  # 4 methods x 2 seeds
    assert (out / "figure2.png").stat().st_size > 10_000
    best = (out / "best_params.json").read_text()
    assert "method.target_weight.tau" in best and "method.weight" in best
    stamps = {p: p.stat().st_mtime for p in tmp_path.rglob("metrics.json")}

    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    # nothing finished was run again
    assert {p: p.stat().st_mtime for p in tmp_path.rglob("metrics.json")} == stamps
    assert "trials" not in second.stdout  # no search was started again
