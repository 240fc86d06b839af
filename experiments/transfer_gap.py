"""Is the embedded digits pair a real transfer problem? Target-only vs pre-train-then-fine-tune.

For each target size N and seed, trains ``method=target_only`` and ``method=finetune`` with the
default digits settings and records the test accuracy of each best-validation checkpoint. Writes
``experiments/results/digits/transfer_gap.csv`` (one row per finished run, appended as runs finish,
so a killed job started again skips them) and ``transfer_gap.md`` (mean ± std per N).

    python experiments/transfer_gap.py [--sizes 10 20 50 200 997] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from lightning_stl.reporting.tables import accuracy_stats, markdown_table, stat_cells
from lightning_stl.run import compose_config, train

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "digits"
METHODS = ("target_only", "finetune")
FIELDS = ["method", "target_size", "seed", "test_acc", "best_val_acc", "total_steps", "wall_time_s"]


def run_one(method: str, size: int, seed: int, work: Path) -> dict:
    overrides = [
        f"method={method}",
        f"data.target_size={size}",
        f"seed={seed}",
        "trainer.enable_progress_bar=false",
        "callbacks=none",
    ]
    return train(compose_config(overrides, work / f"{method}_n{size}_s{seed}", ROOT / "data"))


def summarize(rows: list[dict]) -> str:
    rows = [{**r, "target_size": int(r["target_size"])} for r in rows]  # read back as strings
    lines = []
    for n in sorted({r["target_size"] for r in rows}):
        stats = {m: accuracy_stats(rows, method=m, target_size=n) for m in METHODS}
        if None in stats.values():
            continue
        gain = stats["finetune"][0] - stats["target_only"][0]
        cells = [stat_cells(stat, None, digits=1)[0] for stat in stats.values()]
        lines.append([str(n), *cells, f"{gain:+.1f}"])
    seeds = sorted({int(r["seed"]) for r in rows})
    return (
        "Test accuracy (%) on the 500 held-out UCI digits, best-validation checkpoint, mean ± std over "
        f"seeds {seeds}. Made by `python experiments/transfer_gap.py`.\n\n"
        + markdown_table(["N", "target only", "fine-tune", "gain (points)"], lines, "---:")
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 20, 50, 200, 997])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "transfer_gap")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    table = OUT / "transfer_gap.csv"
    rows = list(csv.DictReader(table.open())) if table.exists() else []
    done = {(r["method"], int(r["target_size"]), int(r["seed"])) for r in rows}
    for size in args.sizes:
        for seed in args.seeds:
            for method in METHODS:
                if (method, size, seed) in done:
                    continue
                metrics = run_one(method, size, seed, args.work)
                row = {k: metrics[k] for k in FIELDS if k in metrics} | {"method": method}
                new = not table.exists()
                with table.open("a", newline="") as handle:
                    writer = csv.DictWriter(handle, FIELDS)
                    if new:
                        writer.writeheader()
                    writer.writerow(row)
                rows.append({k: str(v) for k, v in row.items()})
                (OUT / "transfer_gap.md").write_text(summarize(rows))
                print(f"{method} N={size} seed={seed}: test {metrics['test_acc']:.4f}", flush=True)
    (OUT / "transfer_gap.md").write_text(summarize(rows))
    print((OUT / "transfer_gap.md").read_text())


if __name__ == "__main__":
    main()
