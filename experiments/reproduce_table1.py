"""Rebuild Table 1 and Figure 2 of Smooth Transfer Learning.

For every target size N of the pair's grid: Target (``method=target_only``), Fine-tune
(``method=finetune``), Multi-task (the fixed weight found by ``hparams_search=multitask_tpe``) and
Ours (ω found by ``hparams_search=smooth_tpe``), each retrained on several seeds and tested on its
best-validation checkpoint. Writes under ``experiments/results/<pair>/<profile>/``:

- ``table1.md`` / ``table1.csv``: the paper's layout, mean ± std over seeds, best per row in bold;
- ``figure2.png``: the best λ(t) of each N on one plot, the early-stopped step of each dashed;
- ``runs.csv``: every finished run (the rows the table is made from), ``best_params.json``.

A profile's ``smooth_search`` / ``multitask_search`` choose the search (``smooth_tpe`` and
``multitask_tpe`` by default; ``smooth_asha`` / ``multitask_asha``: the multi-fidelity search of
issue 13, each trial's ω climbing run lengths T/8 ... T by successive halving).

Resumable: a finished run (its ``metrics.json``) is never run again, and the TPE searches keep
their trials in ``<work>/studies.db`` (SQLite), so a killed reproduction started again picks up
where it stopped. ``make reproduce-table1 EXPERIMENT=digits PROFILE=quick`` calls this.

    python experiments/reproduce_table1.py --experiment digits --profile quick --jobs 2
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import optuna

from lightning_stl.errors import positive_int, reports_input_errors
from lightning_stl.reporting.profiles import read_profile
from lightning_stl.reporting.runs import print_cell, run_row, write_runs_csv
from lightning_stl.reporting.tables import accuracy_stats, markdown_table, stat_cells, write_table

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("target_only", "finetune", "multitask", "smooth")
COLUMNS = {
    "target_only": "Target",
    "finetune": "Fine-tune",
    "multitask": "Multi-task",
    "smooth": "Ours",
}
SEARCHES = {
    "multitask": ("multitask_tpe", "multitask_trials"),
    "smooth": ("smooth_tpe", "smooth_trials"),
}


def load_profile(experiment: str, profile: str) -> dict[str, Any]:
    """The settings of ``experiment``/``profile`` in ``experiments/profiles.yaml``."""
    return read_profile(ROOT / "experiments" / "profiles.yaml", experiment, profile)


def train_cell(overrides: list[str], run_dir: str, data_dir: str) -> dict[str, Any]:
    """One training run in this process (a pool worker keeps its imports between runs).

    A run folder that already holds a finished run of the same settings is read, not trained
    again; one that holds a run of other settings (e.g. a profile's overrides changed since) is
    refused with the folder and the settings that differ, never reused silently.
    """
    from lightning_stl.run import compose_config, train
    from lightning_stl.run_files import check_same_run

    cfg = compose_config(overrides, run_dir, data_dir)
    metrics_file = Path(run_dir) / "metrics.json"
    if metrics_file.exists():
        check_same_run(Path(run_dir), cfg)
        return json.loads(metrics_file.read_text())
    return train(cfg)


def cell_result(job: Any) -> dict[str, Any]:
    """``job.result()``; a refused run folder stops the driver with its one-line message."""
    try:
        return job.result()
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None


def run_search(
    search: str,
    experiment: str,
    size: int,
    trials: int,
    batch: int,
    jobs: int,
    overrides: list[str],
    work: Path,
    data_dir: str,
    startup_trials: int | None = None,
) -> dict[str, float]:
    """The TPE search of one cell through Hydra multirun; its best parameters."""
    storage = f"sqlite:///{work / 'studies.db'}"
    name = f"{search}_n{size}"
    command = [
        sys.executable,
        "-m",
        "lightning_stl.run",
        "-m",
        f"hparams_search={search}",
        f"+experiment={experiment}",
        f"data.target_size={size}",
        # searched with a seed that no retraining run uses, so that no table entry is the very
        # run its parameters were picked on
        "seed=1000",
        *overrides,
        f"hydra.sweeper.storage={storage}",
        f"hydra.sweeper.study_name={name}",
        f"hydra.sweeper.n_trials={trials}",
        f"hydra.sweeper.n_jobs={batch}",
        # each row's search starts from its own random candidates
        f"hydra.sweeper.sampler.seed={size}",
        f"hydra.sweep.dir={work / search / f'n{size}'}",
    ]
    if startup_trials is not None:
        command.append(f"hydra.sweeper.sampler.n_startup_trials={startup_trials}")
    if jobs > 1:
        command += ["hydra/launcher=parallel", f"hydra.launcher.n_jobs={jobs}", "torch_threads=1"]
    env = dict(os.environ, LIGHTNING_STL_DATA=data_dir)
    log_file = work / search / f"n{size}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"[{time.strftime('%H:%M:%S')}] {search} N={size}: {trials} trials (log {log_file})",
        flush=True,
    )
    with log_file.open("a") as log:
        subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    study = optuna.load_study(study_name=name, storage=storage)
    return dict(study.best_trial.params)


def summarize(rows: list[dict[str, Any]], sizes: list[int]) -> tuple[str, list[list[str]]]:
    """Markdown and CSV of Table 1: mean ± std of the test accuracy, best mean per row bold."""
    header = ["N", *(COLUMNS[m] for m in METHODS)]
    lines, table = [], [header]
    for size in sizes:
        stats = {m: accuracy_stats(rows, method=m, target_size=size) for m in METHODS}
        means = [stat[0] for stat in stats.values() if stat is not None]
        if not means:
            continue
        cells = [stat_cells(stats[method], max(means), digits=1) for method in METHODS]
        lines.append([f"{size:,}", *(markdown for markdown, _ in cells)])
        table.append([str(size), *(csv_cell for _, csv_cell in cells)])
    return markdown_table(header, lines, first_align="---:"), table


def draw_figure2(
    curves: dict[int, tuple[list[int], list[float], int | None]], path: Path, title: str
) -> None:
    """Figure 2: the best λ(t) per N, the early-stopped step of each dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_stl.reporting.target_weight_plot import save_figure

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=130)
    colors = plt.cm.viridis([i / max(1, len(curves) - 1) for i in range(len(curves))])
    for color, (size, (steps, weights, best)) in zip(colors, sorted(curves.items()), strict=True):
        ax.plot(steps, weights, color=color, lw=1.8, label=f"N = {size:,}")
        if best is not None:
            ax.axvline(best, color=color, ls="--", lw=1.0)
    ax.set_xlabel("iteration t")
    ax.set_ylabel("λ(t)")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    save_figure(fig, path)


def read_curve(run_dir: Path) -> tuple[list[int], list[float], int | None]:
    with (run_dir / "target_weight.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    best = json.loads((run_dir / "metrics.json").read_text()).get("best_step")
    return [int(r["step"]) for r in rows], [float(r["target_weight"]) for r in rows], best


@reports_input_errors
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", default="digits")
    parser.add_argument("--profile", default="quick")
    parser.add_argument(
        "--jobs", type=positive_int, default=1, help="runs at once (one per GPU on a GPU machine)"
    )
    parser.add_argument(
        "--work", type=Path, default=None, help="run folders (default outputs/table1/...)"
    )
    parser.add_argument("--data", default=os.environ.get("LIGHTNING_STL_DATA", str(ROOT / "data")))
    parser.add_argument(
        "--out", type=Path, default=None, help="default experiments/results/<pair>/<profile>"
    )
    args = parser.parse_args()
    profile = load_profile(args.experiment, args.profile)
    out = args.out or ROOT / "experiments" / "results" / args.experiment / args.profile
    work = (args.work or ROOT / "outputs" / "table1" / args.experiment / args.profile).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    base = [
        f"+experiment={args.experiment}",
        *profile.get("overrides", []),
        "trainer.enable_progress_bar=false",
        "callbacks=none",
    ]
    if args.jobs > 1:
        base.append("torch_threads=1")  # parallel runs on a CPU share its cores
    sizes, seeds = [int(n) for n in profile["sizes"]], [int(s) for s in profile["seeds"]]
    started = time.time()

    best_params: dict[str, dict[str, float]] = {}
    params_file = out / "best_params.json"
    if params_file.exists():
        best_params = json.loads(params_file.read_text())
    rows: list[dict[str, Any]] = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for size in sizes:
            for method in METHODS:
                extra = [*base, f"method={method}", f"data.target_size={size}"]
                extra += (profile.get("size_overrides") or {}).get(size, {}).get(method, [])
                if method in SEARCHES:
                    search, budget = SEARCHES[method]
                    search = profile.get(f"{method}_search", search)  # e.g. smooth_asha
                    key = f"{method}/n{size}"
                    if key not in best_params:
                        best_params[key] = run_search(
                            search,
                            args.experiment,
                            size,
                            profile[budget],
                            profile["batch"],
                            args.jobs,
                            profile.get("overrides", []),
                            work,
                            args.data,
                            profile.get("startup_trials"),
                        )
                        params_file.write_text(json.dumps(best_params, indent=1))
                    extra += [f"{k}={v!r}" for k, v in best_params[key].items()]
                jobs = []
                for seed in seeds:
                    run_dir = work / method / f"n{size}" / f"seed{seed}"
                    jobs.append(
                        (
                            seed,
                            run_dir,
                            pool.submit(
                                train_cell, [*extra, f"seed={seed}"], str(run_dir), args.data
                            ),
                        )
                    )
                for seed, run_dir, job in jobs:
                    keys = {"method": method, "target_size": size, "seed": seed}
                    rows.append(run_row(cell_result(job), run_dir, **keys))
                print_cell(f"{COLUMNS[method]} N={size}", rows[-len(seeds) :])
                write_outputs(rows, sizes, out, args, best_params, work, seeds)
    write_outputs(rows, sizes, out, args, best_params, work, seeds)
    print(f"done in {(time.time() - started) / 60:.1f} min -> {out}")
    print((out / "table1.md").read_text())


def write_outputs(rows, sizes, out: Path, args, best_params, work: Path, seeds) -> None:
    markdown, table = summarize(rows, sizes)
    write_table(
        out / "table1",
        "Test accuracy (%) on the target, best-validation checkpoint, mean ± std over seeds "
        f"{seeds}.",
        f"make reproduce-table1 EXPERIMENT={args.experiment} PROFILE={args.profile}",
        markdown,
        table,
    )
    write_runs_csv(rows, out / "runs.csv", ROOT)
    curves = {}
    for size in sizes:
        run_dir = work / "smooth" / f"n{size}" / f"seed{seeds[0]}"
        if (run_dir / "metrics.json").exists():
            curves[size] = read_curve(run_dir)
    if curves:
        draw_figure2(
            curves, out / "figure2.png", f"best λ(t) per N, {args.experiment} ({args.profile})"
        )


if __name__ == "__main__":
    main()
