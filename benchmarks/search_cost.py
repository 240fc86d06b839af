"""What the multi-fidelity ω search costs against the paper's protocol, and whether its ω is as good.

For each target size N of ``--sizes`` on the digits pair:

1. **the paper's protocol**: ``hparams_search=smooth_tpe``, 99 TPE trials at full length T, asked
   11 at a time (Smooth Transfer Learning, App. A.1), TPE seeded with N as in
   ``make reproduce-table1``;
2. **the multi-fidelity search**: ``hparams_search=smooth_asha`` (TPE + asynchronous successive
   halving over T/8, T/4, T/2, T), ``--asha-trials`` trials, the same seeds;
3. the compute (CPU-seconds of every training run of each search, from their ``metrics.json``:
   ``time.process_time`` of the run's process, all threads) the multi-fidelity search spends until
   a full-length trial reaches the protocol's best validation accuracy, against the protocol's
   total; and each search's whole compute, imports, Hydra and the sweeper included (the sweep
   processes' ``RUSAGE_CHILDREN``, kept per invocation in ``cpu_ledger.json`` so that a resumed
   search adds to what the killed one spent);
4. the ω each search picks, retrained at full T on ``--seeds`` (the same N images per seed for
   both: paired), tested on the best-validation checkpoint: mean ± std, the paired difference
   (multi-fidelity − protocol) with its 95% paired-t interval, whether that interval holds 0
   (no difference the seeds can tell), and whether the multi-fidelity mean lies inside the
   protocol's 95% interval over seeds.

Goal (issue 13): ≤ 25% of the protocol's compute for an ω whose retrained test accuracy is within
the protocol's interval. Both searches and the retraining are resumable (SQLite studies, run
folders with ``metrics.json``): start the same command again after a kill. Writes
``experiments/results/digits/search_cost/{search_cost.md,runs.csv,results.json}`` after every N;
an N finished earlier (``results.json``, committed) is kept in the table, so the sizes can be run
one invocation (one session) at a time: ``--sizes 10``, then ``--sizes 50``.

    python benchmarks/search_cost.py --sizes 10 50 --seeds 0 1 2 3 4 --jobs 2
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import optuna

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
from reproduce_table1 import run_search, train_cell  # noqa: E402

from lightning_stl.reporting.tables import mean_std, paired_difference, write_csv_rows  # noqa: E402

PROTOCOL = ("smooth_tpe", 99)
EXPERIMENT = "digits"


def search_runs(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every finished training run of a sweep folder, in the order they ended."""
    runs = []
    for path in sweep_dir.rglob("metrics.json"):
        metrics = json.loads(path.read_text())
        runs.append(
            {
                "run_dir": str(path.parent),
                "run_fraction": float(metrics.get("run_fraction", 1.0)),
                "best_val_acc": metrics["best_val_acc"],
                "cpu_time_s": float(metrics.get("cpu_time_s") or 0.0),
                "wall_time_s": float(metrics["wall_time_s"]),
                "ended_at": float(metrics["ended_at"]),
            }
        )
    return sorted(runs, key=lambda run: run["ended_at"])


def cost_to_reach(runs: list[dict[str, Any]], target: float) -> float | None:
    """CPU-seconds spent until a full-length run reaches validation accuracy ``target``."""
    spent = 0.0
    for run in runs:
        spent += run["cpu_time_s"]
        if run["run_fraction"] == 1.0 and (run["best_val_acc"] or 0.0) >= target:
            return spent
    return None


def search_with_ledger(
    search: str, size: int, trials: int, jobs: int, work: Path, data: str
) -> None:
    """Run (or resume) a search and add the CPU its processes spent to ``cpu_ledger.json``, also
    when it fails or this script is interrupted (what the sweep spent until then counts)."""
    ledger = work / "cpu_ledger.json"
    entries = json.loads(ledger.read_text()) if ledger.exists() else []
    mine = [e for e in entries if e["search"] == search and e["size"] == size]
    # runs from before the ledger was kept: their sweep's own CPU was never counted
    predates = not mine and any((work / search / f"n{size}").rglob("metrics.json"))
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    try:
        run_search(search, EXPERIMENT, size, trials, 11, jobs, [], work, data, None)
    finally:
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        spent = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        entries.append(
            {
                "search": search,
                "size": size,
                "cpu_s": spent,
                "wall_s": time.time() - started,
                "predates_ledger": predates,
            }
        )
        ledger.write_text(json.dumps(entries, indent=1))


def ledger_cpu(work: Path, search: str, size: int) -> float | None:
    """The CPU-seconds every invocation of a search spent, or None when there is none or the
    search had runs before its first ledger entry (its whole compute is then not known)."""
    ledger = work / "cpu_ledger.json"
    entries = json.loads(ledger.read_text()) if ledger.exists() else []
    mine = [e for e in entries if e["search"] == search and e["size"] == size]
    if not mine or any(e.get("predates_ledger") for e in mine):
        return None
    return sum(e["cpu_s"] for e in mine)


def best_params(work: Path, search: str, size: int) -> tuple[dict[str, Any], float]:
    study = optuna.load_study(
        study_name=f"{search}_n{size}", storage=f"sqlite:///{work / 'studies.db'}"
    )
    return dict(study.best_trial.params), float(study.best_value)


def retrain(
    name: str, params: dict[str, Any], size: int, seeds: list[int], work: Path, data: str
) -> dict[int, float]:
    accuracies = {}
    for seed in seeds:
        overrides = [
            f"+experiment={EXPERIMENT}",
            "method=smooth",
            "callbacks=none",
            "trainer.enable_progress_bar=false",
            f"data.target_size={size}",
            f"seed={seed}",
            *(f"{k}={v!r}" for k, v in params.items()),
        ]
        run_dir = work / "retrain" / name / f"n{size}" / f"seed{seed}"
        accuracies[seed] = 100 * float(train_cell(overrides, str(run_dir), data)["test_acc"])
    return accuracies


def report(results: list[dict[str, Any]], seeds: list[int]) -> str:
    lines = [
        "| N | protocol: CPU-h of runs (whole sweep), best val | multi-fidelity: CPU-h of runs (whole sweep), best val | CPU to reach the protocol's best val | retrained test acc (%) protocol ω | multi-fidelity ω | difference [95% paired-t CI] | CI holds 0 | inside the protocol's interval |",
        "|---:|---|---|---|---:|---:|---|---|---|",
    ]
    for r in results:
        reach = (
            f"{r['reach_s'] / 3600:.2f} h = **{r['reach_s'] / r['protocol_s']:.0%}** of the protocol"
            if r["reach_s"] is not None
            else f"not reached ({r['asha_s'] / r['protocol_s']:.0%} spent in all)"
        )
        p, a = (
            [r["retrained"]["protocol"][s] for s in r.get("seeds", seeds)],
            [r["retrained"]["asha"][s] for s in r.get("seeds", seeds)],
        )
        (pm, ps, n), (am, as_, _) = mean_std(p), mean_std(a)
        diff, low, high, _ = paired_difference(p, a)
        if n > 1 and math.isfinite(low):
            half = (ps / n**0.5) * _t(n)
            holds_zero = "yes" if low <= 0 <= high else "no"
            inside = f"{'yes' if abs(am - pm) <= half else 'no'} (protocol mean ± {half:.2f})"
        else:  # one seed: no interval
            holds_zero = inside = "n/a (one seed)"
        lines.append(
            f"| {r['size']} | {_hours(r['protocol_s'], r['protocol_all_s'])}, "
            f"{r['protocol_val']:.4f} | {_hours(r['asha_s'], r['asha_all_s'])} "
            f"({r['asha_s'] / r['protocol_s']:.0%}), {r['asha_val']:.4f} | {reach} | "
            f"{pm:.2f} ± {ps:.2f} | {am:.2f} ± {as_:.2f} | {diff:+.2f} [{low:+.2f}, {high:+.2f}] | "
            f"{holds_zero} | {inside} |"
        )
    return "\n".join(lines) + "\n"


def load_results(path: Path) -> dict[int, dict[str, Any]]:
    """The N finished by earlier invocations (``results.json``), seeds as integers again."""
    if not path.exists():
        return {}
    results = {int(size): result for size, result in json.loads(path.read_text()).items()}
    for result in results.values():
        result["retrained"] = {
            name: {int(seed): acc for seed, acc in accs.items()}
            for name, accs in result["retrained"].items()
        }
    return results


def _hours(runs_s: float, all_s: float | None) -> str:
    whole = f"{all_s / 3600:.2f} h" if all_s is not None else "not kept"
    return f"{runs_s / 3600:.2f} h ({whole})"


def _t(n: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--asha-trials", type=int, default=40)
    parser.add_argument("--jobs", type=int, default=2, help="trials at once (one thread each)")
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "search_cost")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "experiments" / "results" / EXPERIMENT / "search_cost"
    )
    parser.add_argument("--data", default=os.environ.get("LIGHTNING_STL_DATA", str(ROOT / "data")))
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "results.json"
    finished = load_results(saved)
    rows: list[dict[str, Any]] = []
    if (args.out / "runs.csv").exists():
        with (args.out / "runs.csv").open() as handle:
            rows = [r for r in csv.DictReader(handle) if int(r["size"]) not in args.sizes]
    for size in args.sizes:
        started = time.time()
        searches = {"protocol": PROTOCOL, "asha": ("smooth_asha", args.asha_trials)}
        found = {}
        for name, (search, trials) in searches.items():
            search_with_ledger(search, size, trials, args.jobs, work, args.data)
            runs = search_runs(work / search / f"n{size}")
            rows += [{"size": size, "search": name, **run} for run in runs]
            params, value = best_params(work, search, size)
            found[name] = (params, value, runs)
        protocol_s = sum(run["cpu_time_s"] for run in found["protocol"][2])
        asha_s = sum(run["cpu_time_s"] for run in found["asha"][2])
        retrained = {
            name: retrain(name, found[name][0], size, args.seeds, work, args.data) for name in found
        }
        finished[size] = {
            "size": size,
            "protocol_s": protocol_s,
            "protocol_val": found["protocol"][1],
            "protocol_all_s": ledger_cpu(work, PROTOCOL[0], size),
            "asha_all_s": ledger_cpu(work, "smooth_asha", size),
            "asha_s": asha_s,
            "asha_val": found["asha"][1],
            "reach_s": cost_to_reach(found["asha"][2], found["protocol"][1]),
            "retrained": retrained,
            "params": {name: found[name][0] for name in found},
            "seeds": args.seeds,
        }
        saved.write_text(json.dumps(finished, indent=1, sort_keys=True))
        results = [finished[n] for n in sorted(finished)]
        write_csv_rows(rows, args.out / "runs.csv")
        command = " ".join(["python benchmarks/search_cost.py", *sys.argv[1:]])
        params_lines = "".join(
            f"- N = {r['size']}: protocol ω {r['params']['protocol']}, multi-fidelity ω {r['params']['asha']}\n"
            for r in results
        )
        (args.out / "search_cost.md").write_text(
            f"The ω search on digits: the paper's protocol (99 TPE trials at full T, 11 at a time) "
            f"vs TPE + successive halving over T/8 ... T ({args.asha_trials} trials), search seed "
            f"1000, retrained on seeds {args.seeds}.\n\n`{command}` (and earlier invocations "
            "for the other N)\n\n" + report(results, args.seeds) + "\n" + params_lines
        )
        print(f"N={size} done in {(time.time() - started) / 60:.1f} min", flush=True)
    print((args.out / "search_cost.md").read_text())


if __name__ == "__main__":
    main()
