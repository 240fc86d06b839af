"""Rebuild SMILE's comparison tables (Table 2/3 layout, Table 5 ablations) on a target.

Every method of the profile (L², Mixup, SMILE and its two ablations by default) is trained on
every setting (a target size N, or one of the paper's sampling protocols) with several seeds and
tested; the table gives the test accuracy as mean ± std over seeds. Writes under
``experiments/results/<experiment>/smile_<profile>/``:

- ``table.md`` / ``table.csv``: methods as rows, settings as columns (the paper's Table 2 layout),
  the best mean per column in bold;
- ``bars.png``: the same numbers as a bar chart with ±std error bars;
- ``runs.csv``: every finished run the table is made from.

A profile (``experiments/smile_profiles.yaml``) may give ``method_overrides``: extra overrides
of one method's runs (the paper profiles of CUB-200, Stanford Cars and FGVC-Aircraft carry the
authors' per-data-set baseline weights there).

Resumable: a finished run (its ``metrics.json``) is never run again, and the source pre-training
(``pretraining.on_source``) is cached, so a killed reproduction started again picks up where it
stopped. ``make reproduce-smile EXPERIMENT=digits PROFILE=quick`` calls this.

    python experiments/reproduce_smile.py --experiment digits --profile quick --jobs 2
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from reproduce_table1 import cell_result, train_cell  # one way to run a cell, shared with Table 1

from lightning_stl.errors import positive_int, reports_input_errors
from lightning_stl.reporting.profiles import read_profile
from lightning_stl.reporting.runs import print_cell, run_row, write_runs_csv
from lightning_stl.reporting.tables import accuracy_stats, markdown_table, stat_cells, write_table

ROOT = Path(__file__).resolve().parents[1]
LABELS = {
    "finetune_l2": "L²",
    "mixup": "Mixup",
    "l2sp": "L²-SP",
    "delta": "DELTA",
    "bss": "BSS",
    "rifle": "RIFLE",
    "cotuning": "Co-Tuning",
    "regsl": "RegSL",
    "delta_mixup": "DELTA + Mixup",
    "bss_mixup": "BSS + Mixup",
    "rifle_mixup": "RIFLE + Mixup",
    "smile": "SMILE",
    "smile_official": "SMILE (official code)",
    "smile_no_fc": "SMILE w/o L^FC",
    "smile_no_fe": "SMILE w/o L^FE",
}


def load_profile(experiment: str, profile: str) -> dict[str, Any]:
    """The settings of ``experiment``/``profile`` in ``experiments/smile_profiles.yaml``."""
    chosen = read_profile(ROOT / "experiments" / "smile_profiles.yaml", experiment, profile)
    overrides = chosen.get("method_overrides") or {}
    stray = sorted(set(overrides) - set(chosen["methods"]))
    if stray:
        raise SystemExit(
            f"{experiment}/{profile}: method_overrides of {stray} name no method of the profile "
            f"({', '.join(chosen['methods'])})"
        )
    for method, values in overrides.items():
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise SystemExit(
                f"{experiment}/{profile}: method_overrides.{method}={values!r} is not allowed: "
                "it must be a list of Hydra overrides (strings)"
            )
    return chosen


def cell_overrides(
    profile: dict[str, Any], method: str, setting: list[str], seed: int, base: list[str] = ()
) -> list[str]:
    """The Hydra overrides of one cell: the run-wide ``base``, the setting's, ``method=``, the
    profile's ``method_overrides`` of that method (the per-data-set settings of the authors' code,
    e.g. L2-SP's α) and ``seed=``."""
    per_method = (profile.get("method_overrides") or {}).get(method) or []
    return [*base, *setting, f"method={method}", *per_method, f"seed={seed}"]


def previous_rows(
    path: Path,
    methods: list[str],
    exclude: list[str],
    settings: list[str] | None = None,
    seeds: list[int] | None = None,
) -> list[dict[str, Any]]:
    """The rows of an earlier ``runs.csv`` of the profile's ``methods`` not in ``exclude`` (and of
    its ``settings`` and ``seeds``), with numbers parsed and run folders absolute: the rows a run
    of ``--methods`` keeps in the table."""
    if not path.exists():
        return []
    numbers = {"seed": int, "target_size": int, "best_step": int, "total_steps": int}
    floats = ("test_acc", "best_val_acc", "wall_time_s")
    rows = []
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["method"] not in methods or row["method"] in exclude:
                continue
            if settings is not None and row["setting"] not in settings:
                continue
            if seeds is not None and int(row["seed"]) not in seeds:
                continue
            parsed: dict[str, Any] = dict(row)
            for key, kind in numbers.items():
                parsed[key] = kind(row[key]) if row.get(key) else None
            for key in floats:
                parsed[key] = float(row[key]) if row.get(key) else None
            parsed["run_dir"] = str(ROOT / row["run_dir"])
            rows.append(parsed)
    return rows


def summarize(
    rows: list[dict[str, Any]], methods: list[str], settings: list[str]
) -> tuple[str, list[list[str]], dict[tuple[str, str], tuple[float, float, int]]]:
    """Markdown and CSV of the table (methods × settings, mean ± std), and the statistics."""
    stats: dict[tuple[str, str], tuple[float, float, int]] = {}
    for method in methods:
        for setting in settings:
            stat = accuracy_stats(rows, method=method, setting=setting)
            if stat is not None:
                stats[method, setting] = stat
    best = {
        s: max((v[0] for (m, s2), v in stats.items() if s2 == s), default=None) for s in settings
    }
    header = ["Method", *settings]
    lines, table = [], [header]
    for method in methods:
        cells = [stat_cells(stats.get((method, s)), best[s], digits=2) for s in settings]
        lines.append([LABELS.get(method, method), *(markdown for markdown, _ in cells)])
        table.append([method, *(csv_cell for _, csv_cell in cells)])
    return markdown_table(header, lines, first_align=":---"), table, stats


def draw_bars(
    stats: dict[tuple[str, str], tuple[float, float, int]],
    methods: list[str],
    settings: list[str],
    path: Path,
    title: str,
) -> None:
    """Grouped bars: one group per setting, one bar per method, ±std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_stl.reporting.target_weight_plot import save_figure

    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(3.2 + 1.6 * len(settings), 3.6), dpi=130)
    palette = plt.cm.tab20 if len(methods) > 10 else plt.cm.tab10
    colors = [palette(i % palette.N) for i in range(len(methods))]
    lows = [v[0] - v[1] for v in stats.values()]
    for i, method in enumerate(methods):
        xs, means, stds = [], [], []
        for j, setting in enumerate(settings):
            if (method, setting) in stats:
                mean, std, _ = stats[method, setting]
                xs.append(j + (i - (len(methods) - 1) / 2) * width)
                means.append(mean)
                stds.append(std)
        ax.bar(
            xs,
            means,
            width,
            yerr=stds,
            capsize=2,
            color=colors[i],
            label=LABELS.get(method, method),
        )
    ax.set_xticks(range(len(settings)), settings)
    ax.set_ylabel("test accuracy (%)")
    if lows:
        ax.set_ylim(max(0.0, min(lows) - 5), 100)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    save_figure(fig, path)


def write_outputs(
    rows: list[dict[str, Any]], methods: list[str], settings: list[str], out: Path, args, seeds
) -> None:
    markdown, table, stats = summarize(rows, methods, settings)
    write_table(
        out / "table",
        f"Test accuracy (%) on the target, mean ± std over seeds {seeds}.",
        f"make reproduce-smile EXPERIMENT={args.experiment} PROFILE={args.profile}",
        markdown,
        table,
    )
    if rows:
        write_runs_csv(rows, out / "runs.csv", ROOT)
    if stats:
        draw_bars(stats, methods, settings, out / "bars.png", f"{args.experiment} ({args.profile})")


@reports_input_errors
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", default="digits")
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--jobs", type=positive_int, default=1, help="runs at once (one per GPU)")
    parser.add_argument("--work", type=Path, default=None, help="default outputs/smile/...")
    parser.add_argument("--data", default=os.environ.get("LIGHTNING_STL_DATA", str(ROOT / "data")))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="run only these rows of the profile (default: all); the table keeps the other rows "
        "of the runs.csv already in --out. A finished run is never trained again: after a change "
        "of the code, delete the rows' run folders under --work to remake them",
    )
    args = parser.parse_args()
    profile = load_profile(args.experiment, args.profile)
    out = args.out or ROOT / "experiments" / "results" / args.experiment / f"smile_{args.profile}"
    work = (args.work or ROOT / "outputs" / "smile" / args.experiment / args.profile).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    base = [
        f"+experiment={profile['experiment']}",
        *profile.get("overrides", []),
        f"pretraining.cache_dir={work / 'pretrained'}",
        "trainer.enable_progress_bar=false",
        "callbacks=none",
    ]
    if args.jobs > 1:
        base.append("torch_threads=1")  # parallel runs on a CPU share its cores
    methods = table_methods = list(profile["methods"])
    kept: list[dict[str, Any]] = []
    if args.methods:
        unknown = sorted(set(args.methods) - set(methods))
        if unknown:
            raise SystemExit(f"--methods {unknown} are not in the profile: {', '.join(methods)}")
        methods = [m for m in methods if m in args.methods]
        # the other rows of the table stay as an earlier reproduction left them
        kept = previous_rows(
            out / "runs.csv",
            table_methods,
            exclude=methods,
            settings=[str(k) for k in profile["settings"]],
            seeds=[int(s) for s in profile["seeds"]],
        )
    settings = {str(k): list(v) for k, v in profile["settings"].items()}
    seeds = [int(s) for s in profile["seeds"]]
    started = time.time()

    rows: list[dict[str, Any]] = list(kept)
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        # One worker pre-trains the source model (cached) before the others start, so that they
        # do not queue on its lock. Nothing trains in this process: a fork after torch has
        # started its OpenMP threads can hang the workers.
        first_setting, first = next(iter(settings.items()))
        first_job = pool.submit(
            train_cell,
            cell_overrides(profile, methods[0], first, seeds[0], base),
            str(work / methods[0] / _slug(first_setting) / f"seed{seeds[0]}"),
            args.data,
        )
        cell_result(first_job)
        for setting, overrides in settings.items():
            for method in methods:
                jobs = []
                for seed in seeds:
                    run_dir = work / method / _slug(setting) / f"seed{seed}"
                    cell = cell_overrides(profile, method, overrides, seed, base)
                    jobs.append(
                        (seed, run_dir, pool.submit(train_cell, cell, str(run_dir), args.data))
                    )
                for seed, run_dir, job in jobs:
                    metrics = cell_result(job)
                    keys = {"method": method, "setting": setting, "seed": seed}
                    size = metrics.get("target_size")
                    rows.append(run_row(metrics, run_dir, **keys, target_size=size))
                print_cell(f"{LABELS.get(method, method)} {setting}", rows[-len(seeds) :])
                write_outputs(rows, table_methods, list(settings), out, args, seeds)
    write_outputs(rows, table_methods, list(settings), out, args, seeds)
    print(f"done in {(time.time() - started) / 60:.1f} min -> {out}")
    print((out / "table.md").read_text())


def _slug(setting: str) -> str:
    """A folder name for a setting such as ``C:25%/N:400``."""
    return "".join(c if c.isalnum() else "_" for c in setting).strip("_")


if __name__ == "__main__":
    main()
