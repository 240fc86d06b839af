"""How well do short runs rank ω? The measurement the multi-fidelity search is designed from.

Draws ``--omegas`` ω from the search space of ``hparams_search=smooth_tpe`` (Optuna's
``QMCSampler``, scrambled Sobol, seeded: spread evenly over the space, not clumped), trains each at
every ``run_fraction`` of ``--fractions`` for each target size N of ``--sizes`` (seed 1000, the
searches' seed: a search's view of ω), and reports per N and fraction:

- Spearman's ρ between the best validation accuracy at that fraction and at full length, with a
  bootstrap 95% interval over ω (2,000 resamples of the ω);
- how often the full-length best few ω survive a cut to the top 1/η at the short length (η = 2, 3),
  and the regret of such a cut: the best full-length accuracy among the ω it keeps, below the
  best of all (in points);
- with ``--repeat-seed S``, the noise ceiling: the same ρ between two full-length runs of each ω
  on the same N images (training seeds 1000 and S). A short run cannot rank ω better than a
  second full run does.

Writes ``experiments/results/<pair>/fidelity_ranking/{runs.csv,ranking.md}``. Resumable: a run
in that ``runs.csv`` (committed with the results) or a run folder with its ``metrics.json`` is
read, not trained again, so a killed measurement started again, here or on a fresh clone,
continues where it stopped; the tables are rewritten after every ω.

    python experiments/fidelity_ranking.py --sizes 10 50 --omegas 30
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import yaml
from scipy.stats import spearmanr

from lightning_stl.errors import positive_int, reports_input_errors
from lightning_stl.run_fraction import check_run_fraction
from lightning_stl.search_space import parse_search_space

ROOT = Path(__file__).resolve().parents[1]
SEARCH_SEED = 1000  # the seed reproduce_table1's searches train with


def draw_omegas(count: int, seed: int) -> list[dict[str, float]]:
    """``count`` ω from the smooth_tpe search space, a scrambled Sobol sequence (Optuna's QMC)."""
    search = yaml.safe_load((ROOT / "conf" / "hparams_search" / "smooth_tpe.yaml").read_text())
    params = search["hydra"]["sweeper"]["params"]
    space = parse_search_space([f"{k}={v}" for k, v in params.items()])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        sampler=optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)
    )
    omegas = []
    for _ in range(count):
        trial = study.ask(space.distributions)
        omegas.append(dict(trial.params))
        study.tell(trial, 0.0)
    return omegas


def train_run(overrides: list[str], run_dir: Path, data_dir: str) -> dict[str, Any]:
    """One run in this process, or its finished result read back (same settings only)."""
    from lightning_stl.run import compose_config, train
    from lightning_stl.run_files import check_same_run

    cfg = compose_config(overrides, run_dir, data_dir)
    if (run_dir / "metrics.json").exists():
        check_same_run(run_dir, cfg)
        return json.loads((run_dir / "metrics.json").read_text())
    return train(cfg)


def recorded_rows(
    path: Path, omegas: list[dict[str, float]]
) -> dict[tuple[int, int, float, int], dict[str, Any]]:
    """The rows of an earlier ``runs.csv`` (committed with the results) by (N, ω, fraction,
    seed), so that a measurement continued on a machine without the run folders does not train
    them again. A row whose ω differs from the one drawn now is refused."""
    if not path.exists():
        return {}
    found = {}
    with path.open() as handle:
        for raw in csv.DictReader(handle):
            row: dict[str, Any] = {
                k: (None if v == "" else _number(v)) if k != "status" else v for k, v in raw.items()
            }
            row["seed"] = int(row.get("seed") or SEARCH_SEED)
            omega = omegas[int(row["omega"])]
            drawn = {k.rsplit(".", 1)[-1]: v for k, v in omega.items()}
            if any(abs(float(row[k]) - v) > 1e-9 * max(1.0, abs(v)) for k, v in drawn.items()):
                raise ValueError(
                    f"{path} holds ω {int(row['omega'])} = {[row[k] for k in drawn]}, not the "
                    f"{list(drawn.values())} drawn now: use the same --sampler-seed, or --out"
                )
            key = (int(row["target_size"]), int(row["omega"]), float(row["fraction"]), row["seed"])
            found[key] = row
    return found


def _number(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() and "." not in text and "e" not in text else value


def bootstrap_spearman(
    x: np.ndarray, y: np.ndarray, rng: np.random.Generator
) -> tuple[float, float]:
    """A percentile-bootstrap 95% interval of Spearman's ρ, resampling the ω."""
    values = []
    for _ in range(2000):
        index = rng.integers(0, len(x), len(x))
        if np.ptp(x[index]) == 0 or np.ptp(y[index]) == 0:
            continue
        values.append(spearmanr(x[index], y[index]).statistic)
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def kept_by_cut(short: np.ndarray, eta: int) -> np.ndarray:
    """Which ω a successive-halving cut at the short length keeps: the best max(1, ⌊n/η⌋), as
    Optuna's ``SuccessiveHalvingPruner`` promotes (ties at the cut kept)."""
    keep = max(1, len(short) // eta)
    threshold = np.sort(short)[::-1][keep - 1]
    return short >= threshold


def survives(short: np.ndarray, full: np.ndarray, eta: int, top: int) -> float:
    """The share of the ``top`` best ω at full length that the cut to the top 1/η keeps."""
    best = np.argsort(-full, kind="stable")[:top]
    return float(np.mean(kept_by_cut(short, eta)[best]))


def regret(short: np.ndarray, full: np.ndarray, eta: int) -> float:
    """How far (points of accuracy) the best full-length ω among those the cut keeps falls
    below the best full-length ω of all."""
    return float(100 * (full.max() - full[kept_by_cut(short, eta)].max()))


def summarize(rows: list[dict[str, Any]], fractions: list[float]) -> str:
    """The Markdown table of ρ and survival per N and fraction."""
    rng = np.random.default_rng(0)
    lines = [
        "| N | fraction of T | ω | Spearman ρ with full T [95% bootstrap CI] | best-3 at T kept by top-1/2 | by top-1/3 | regret of top-1/2 (points) | of top-1/3 |",
        "|---:|---|---:|---|---:|---:|---:|---:|",
    ]
    for size in sorted({r["target_size"] for r in rows}):
        full = {
            r["omega"]: r["val_acc"]
            for r in rows
            if r["target_size"] == size
            and r["fraction"] == 1.0
            and r.get("seed", SEARCH_SEED) == SEARCH_SEED
            and r["val_acc"] is not None
        }
        repeats = sorted({r.get("seed", SEARCH_SEED) for r in rows} - {SEARCH_SEED})
        columns = [(f, SEARCH_SEED, f"{f:g}") for f in fractions if f != 1.0]
        columns += [(1.0, seed, f"1 at seed {seed} (noise ceiling)") for seed in repeats]
        for fraction, seed, label in columns:
            pairs = [
                (r["val_acc"], full[r["omega"]])
                for r in rows
                if r["target_size"] == size
                and r["fraction"] == fraction
                and r.get("seed", SEARCH_SEED) == seed
                and r["omega"] in full
                and r["val_acc"] is not None
            ]
            if len(pairs) < 5:
                continue
            short, long = (np.array(v, dtype=float) for v in zip(*pairs, strict=True))
            rho = spearmanr(short, long).statistic
            low, high = bootstrap_spearman(short, long, rng)
            lines.append(
                f"| {size} | {label} | {len(pairs)} | {rho:.2f} [{low:.2f}, {high:.2f}] | "
                f"{survives(short, long, 2, 3):.2f} | {survives(short, long, 3, 3):.2f} | "
                f"{regret(short, long, 2):.2f} | {regret(short, long, 3):.2f} |"
            )
    return "\n".join(lines) + "\n"


@reports_input_errors
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", default="digits")
    parser.add_argument("--sizes", type=positive_int, nargs="+", default=[10, 50])
    parser.add_argument("--omegas", type=positive_int, default=30)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.125, 0.25, 0.5, 1.0])
    parser.add_argument("--sampler-seed", type=int, default=0)
    parser.add_argument(
        "--repeat-seed", type=int, default=None, help="also train every ω at full T on this seed"
    )
    parser.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--data", default=os.environ.get("LIGHTNING_STL_DATA", str(ROOT / "data")))
    args = parser.parse_args()
    for fraction in args.fractions:
        check_run_fraction(fraction)
    fractions = sorted(set(args.fractions) | {1.0})
    out = args.out or ROOT / "experiments" / "results" / args.experiment / "fidelity_ranking"
    work = (args.work or ROOT / "outputs" / "fidelity_ranking" / args.experiment).resolve()
    out.mkdir(parents=True, exist_ok=True)
    omegas = draw_omegas(args.omegas, args.sampler_seed)
    base = [
        f"+experiment={args.experiment}",
        "method=smooth",
        "callbacks=none",
        "logger=none",
        "trainer.enable_progress_bar=false",
        *args.overrides,
    ]
    runs = [(fraction, SEARCH_SEED) for fraction in fractions]
    if args.repeat_seed is not None:
        runs.append((1.0, args.repeat_seed))
    recorded = recorded_rows(out / "runs.csv", omegas)
    rows: list[dict[str, Any]] = []
    started = time.time()
    for size in args.sizes:
        for index, omega in enumerate(omegas):
            for fraction, seed in runs:
                if (size, index, fraction, seed) in recorded:  # committed: not trained again
                    rows.append(recorded.pop((size, index, fraction, seed)))
                    continue
                run_dir = work / f"n{size}" / f"omega{index:02d}" / f"f{fraction:g}"
                if seed != SEARCH_SEED:
                    run_dir = run_dir.with_name(f"{run_dir.name}_seed{seed}")
                overrides = [
                    *base,
                    f"seed={seed}",
                    f"data.subset_seed={SEARCH_SEED}",  # the same N images: training noise only
                    f"data.target_size={size}",
                    f"run_fraction={fraction}",
                    *(f"{k}={v!r}" for k, v in omega.items()),
                ]
                metrics = train_run(overrides, run_dir, args.data)
                rows.append(
                    {
                        "target_size": size,
                        "omega": index,
                        **{k.rsplit(".", 1)[-1]: v for k, v in omega.items()},
                        "fraction": fraction,
                        "seed": seed,
                        "total_steps": metrics["total_steps"],
                        "val_acc": metrics["best_val_acc"],
                        "test_acc": metrics["test_acc"],
                        "status": metrics["status"],
                        "wall_time_s": round(metrics["wall_time_s"], 2),
                        "cpu_time_s": round(metrics.get("cpu_time_s") or 0.0, 2),
                    }
                )
            print(
                f"[{time.strftime('%H:%M:%S')}] N={size} ω {index + 1}/{len(omegas)} "
                f"({(time.time() - started) / 60:.1f} min)",
                flush=True,
            )
            write_outputs(rows + list(recorded.values()), fractions, out, args)
    write_outputs(rows + list(recorded.values()), fractions, out, args)
    print((out / "ranking.md").read_text())


def write_outputs(rows: list[dict[str, Any]], fractions: list[float], out: Path, args) -> None:
    with (out / "runs.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    command = " ".join(["python experiments/fidelity_ranking.py", *sys.argv[1:]])
    (out / "ranking.md").write_text(
        f"Short runs ranking ω: best validation accuracy at run_fraction f vs at full T, "
        f"{args.experiment}, seed {SEARCH_SEED}.\n\n`{command}`\n\n" + summarize(rows, fractions)
    )


if __name__ == "__main__":
    main()
