"""Does the fast mode lose accuracy? The default run and the digits SMILE run, float32 vs fast.

Each setting is trained on ``--seeds`` seeds twice, with ``speed.fast_mode=false`` (float32,
contiguous) and ``speed.fast_mode=true`` (channels_last + bf16 autocast; refused on a device
without fast bf16), everything else equal, so seed s of both modes draws the same N images and
the same initial weights: the test accuracies are paired. Reports per setting the mean ± std of
each mode, the paired difference fast − float32 with its 95% paired-t interval, and the wall time.

Writes ``experiments/results/digits/fast_mode_parity/{runs.csv,parity.md}``. Resumable: a run
folder with its ``metrics.json`` is read, not trained again.

    python experiments/fast_mode_parity.py --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from lightning_stl.errors import reports_input_errors
from lightning_stl.reporting.tables import mean_std, paired_difference, write_csv_rows

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    # name: overrides (the README's default run; the digits SMILE run at its defaults)
    "default (Smooth Transfer, N = 50)": [],
    "digits SMILE (N = 50)": ["+experiment=digits_smile"],
}
MODES = {"float32": "speed.fast_mode=false", "fast": "speed.fast_mode=true"}


def train_run(overrides: list[str], run_dir: Path, data_dir: str) -> dict[str, Any]:
    """One run in this process, or its finished result read back (same settings only)."""
    from lightning_stl.run import compose_config, train
    from lightning_stl.run_files import check_same_run

    cfg = compose_config(overrides, run_dir, data_dir)
    if (run_dir / "metrics.json").exists():
        check_same_run(run_dir, cfg)
        return json.loads((run_dir / "metrics.json").read_text())
    return train(cfg)


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| setting | seeds | float32 test acc (%) | fast test acc (%) | fast − float32 [95% paired-t CI] | wall s float32 / fast |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for setting in SETTINGS:
        pairs: dict[int, dict[str, dict[str, Any]]] = {}
        for row in rows:
            if row["setting"] == setting:
                pairs.setdefault(row["seed"], {})[row["mode"]] = row
        seeds = sorted(s for s, modes in pairs.items() if len(modes) == 2)
        if not seeds:
            continue
        slow = [100 * pairs[s]["float32"]["test_acc"] for s in seeds]
        fast = [100 * pairs[s]["fast"]["test_acc"] for s in seeds]
        (m0, s0, _), (m1, s1, _) = mean_std(slow), mean_std(fast)
        diff, low, high, _ = paired_difference(slow, fast)
        wall = [sum(pairs[s][mode]["wall_time_s"] for s in seeds) for mode in MODES]
        lines.append(
            f"| {setting} | {', '.join(map(str, seeds))} | {m0:.2f} ± {s0:.2f} | "
            f"{m1:.2f} ± {s1:.2f} | {diff:+.2f} [{low:+.2f}, {high:+.2f}] | "
            f"{wall[0] / len(seeds):.1f} / {wall[1] / len(seeds):.1f} (ratio {wall[1] / wall[0]:.2f}) |"
        )
    return "\n".join(lines) + "\n"


@reports_input_errors
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "fast_mode_parity")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--data", default=os.environ.get("LIGHTNING_STL_DATA", str(ROOT / "data")))
    args = parser.parse_args()
    out = args.out or ROOT / "experiments" / "results" / "digits" / "fast_mode_parity"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        for index, (setting, overrides) in enumerate(SETTINGS.items()):
            for mode, override in MODES.items():
                run_dir = args.work.resolve() / f"setting{index}" / mode / f"seed{seed}"
                base = [*overrides, override, f"seed={seed}", "trainer.enable_progress_bar=false"]
                metrics = train_run(base, run_dir, args.data)
                rows.append(
                    {
                        "setting": setting,
                        "mode": mode,
                        "seed": seed,
                        "test_acc": metrics["test_acc"],
                        "best_val_acc": metrics["best_val_acc"],
                        "best_step": metrics["best_step"],
                        "precision": metrics.get("speed", {}).get("precision"),
                        "wall_time_s": round(metrics["wall_time_s"], 2),
                    }
                )
                print(f"[{time.strftime('%H:%M:%S')}] {setting} {mode} seed {seed}", flush=True)
        write_csv_rows(rows, out / "runs.csv")
        command = " ".join(["python experiments/fast_mode_parity.py", *sys.argv[1:]])
        (out / "parity.md").write_text(
            "Test accuracy of the best-validation checkpoint, float32 vs the fast mode "
            f"(channels_last + bf16 autocast), paired by seed.\n\n`{command}`\n\n{table(rows)}"
        )
    print((out / "parity.md").read_text())


if __name__ == "__main__":
    main()
