"""Trials per hour of a TPE search on the embedded digits pair, with 1 and with 2 parallel workers.

Runs ``python -m lightning_stl.run -m hparams_search=smooth_tpe`` with the quick profile's run
settings (``experiments/profiles.yaml``), once with Hydra's basic launcher (one trial at a time,
torch on every core) and once with ``hydra/launcher=parallel`` (two trials at a time, one thread
each), and prints the trials per hour of each, their ratio, and the seconds per trial spent
outside the trials' runs (the sweep's own overhead: Hydra's job set-up, TPE, the study, the
report, and the sweep process's start-up spread over its trials). Wall time includes everything a
sweep pays for: process start-up, data loading from the caches, training, validation and test.

    python benchmarks/trials_per_hour.py [--trials 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def sweep_seconds(
    trials: int, workers: int, overrides: list[str], folder: Path
) -> tuple[float, float]:
    """(wall seconds of the sweep command, summed wall seconds of its trials' runs)."""
    command = [
        sys.executable,
        "-m",
        "lightning_stl.run",
        "-m",
        "hparams_search=smooth_tpe",
        "+experiment=digits",
        "data.target_size=50",
        *overrides,
        f"hydra.sweeper.n_trials={trials}",
        f"hydra.sweeper.n_jobs={max(workers, 1)}",
        f"hydra.sweep.dir={folder}",
    ]
    if workers > 1:
        command += [
            "hydra/launcher=parallel",
            f"hydra.launcher.n_jobs={workers}",
            "torch_threads=1",
        ]
    env = dict(
        os.environ, LIGHTNING_STL_DATA=os.environ.get("LIGHTNING_STL_DATA", str(ROOT / "data"))
    )
    start = time.perf_counter()
    subprocess.run(
        command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wall = time.perf_counter() - start
    runs = sum(json.loads(path.read_text())["wall_time_s"] for path in folder.rglob("metrics.json"))
    return wall, runs


def import_seconds() -> float:
    """A fresh interpreter's ``import lightning_stl.run`` (what every new trial process pays)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import lightning_stl.run"], cwd=ROOT, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument(
        "--run-fraction", type=float, default=1.0, help="short trials show the overhead"
    )
    args = parser.parse_args()
    profile = yaml.safe_load((ROOT / "experiments" / "profiles.yaml").read_text())["digits"][
        "quick"
    ]
    overrides = [*profile["overrides"], "trainer.enable_progress_bar=false"]
    if args.run_fraction < 1.0:
        overrides.append(f"run_fraction={args.run_fraction}")
    with tempfile.TemporaryDirectory() as tmp:
        (one, runs_one) = sweep_seconds(args.trials, 1, overrides, Path(tmp) / "one")
        (two, runs_two) = sweep_seconds(args.trials, 2, overrides, Path(tmp) / "two")
    imports = import_seconds()
    rate_one, rate_two = 3600 * args.trials / one, 3600 * args.trials / two
    print(
        f"{args.trials} trials of the quick digits profile (N = 50, run_fraction "
        f"{args.run_fraction}), {os.cpu_count()} CPU cores"
    )
    print(
        f"1 worker : {one:7.1f} s  -> {rate_one:6.0f} trials/hour; outside the runs "
        f"{(one - runs_one) / args.trials:.2f} s per trial (the sweep process's start included)"
    )
    print(
        f"2 workers: {two:7.1f} s  -> {rate_two:6.0f} trials/hour; outside the runs "
        f"{(two - runs_two / 2) / args.trials:.2f} s per trial"
    )
    print(f"ratio 2 workers / 1 worker: {rate_two / rate_one:.2f}")
    print(f"a fresh process's `import lightning_stl.run`: {imports:.2f} s (paid once per sweep)")


if __name__ == "__main__":
    main()
