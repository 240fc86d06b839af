"""Trials per hour of a TPE search on the embedded digits pair, with 1 and with 2 parallel workers.

Runs ``python -m lightning_stl.run -m hparams_search=smooth_tpe`` with the quick profile's run
settings (``experiments/profiles.yaml``), once with Hydra's basic launcher (one trial at a time,
torch on every core) and once with ``hydra/launcher=parallel`` (two trials at a time, one thread
each), and prints the trials per hour of each and their ratio. Wall time includes everything a
sweep pays for: process start-up, data loading from the caches, training, validation and test.

    python benchmarks/trials_per_hour.py [--trials 8]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def sweep_seconds(trials: int, workers: int, overrides: list[str], folder: Path) -> float:
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
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=8)
    args = parser.parse_args()
    profile = yaml.safe_load((ROOT / "experiments" / "profiles.yaml").read_text())["digits"][
        "quick"
    ]
    overrides = [*profile["overrides"], "trainer.enable_progress_bar=false"]
    with tempfile.TemporaryDirectory() as tmp:
        one = sweep_seconds(args.trials, 1, overrides, Path(tmp) / "one")
        two = sweep_seconds(args.trials, 2, overrides, Path(tmp) / "two")
    rate_one, rate_two = 3600 * args.trials / one, 3600 * args.trials / two
    print(f"{args.trials} trials of the quick digits profile (N = 50), {os.cpu_count()} CPU cores")
    print(f"1 worker : {one:7.1f} s  -> {rate_one:6.0f} trials/hour")
    print(f"2 workers: {two:7.1f} s  -> {rate_two:6.0f} trials/hour")
    print(f"ratio 2 workers / 1 worker: {rate_two / rate_one:.2f}")


if __name__ == "__main__":
    main()
