"""TPE searches with Hydra multirun and the durable Optuna sweeper: resume, sharing, parallel
trials, and failures that do not crash the sweep."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from lightning_stl.sweeper import DurableOptunaSweeper

ROOT = Path(__file__).resolve().parents[1]
TINY_SWEEP = [
    "+experiment=digits",
    "data.source_options.num_images=400",
    "data.target_size=30",
    "data.source_batch_size=64",
    "data.target_batch_size=64",
    "epochs.joint=2",
    "torch_threads=1",
]


CLI = [sys.executable, "-m", "lightning_stl.run"]


def sweep_args(tmp_path: Path, *extra: str, search: str = "smooth_tpe") -> list[str]:
    """Arguments of ``python -m lightning_stl.run`` for a tiny TPE sweep into ``tmp_path``."""
    return [
        "-m",
        f"hparams_search={search}",
        *TINY_SWEEP,
        f"hydra.sweep.dir={tmp_path}/sweep_${{hydra.sweeper.worker}}_${{now:%H-%M-%S-%f}}",
        *extra,
    ]


def load(storage: str, name: str) -> optuna.Study:
    from lightning_stl.study_storage import JOURNAL, journal_storage

    opened = journal_storage(storage) if storage.startswith(JOURNAL) else storage
    return optuna.load_study(study_name=name, storage=opened)


def storage_url(folder: Path, name: str, kind: str) -> str:
    """A study storage of ``kind``: a SQLite file or Optuna's journal file."""
    return f"sqlite:///{folder}/{name}.db" if kind == "sqlite" else f"journal://{folder}/{name}.log"


STORAGES = pytest.mark.parametrize("kind", ["sqlite", "journal"])


@STORAGES
def test_killed_sweep_resumes_without_losing_or_rerunning_trials(
    tmp_path, subprocess_env, run_cli, kind
):
    storage = storage_url(tmp_path, "study", kind)
    args = sweep_args(
        tmp_path,
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.study_name=resume",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.n_jobs=1",
    )
    first = subprocess.Popen(
        [*CLI, *args],
        cwd=ROOT,
        env=subprocess_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    complete: list[optuna.trial.FrozenTrial] = []
    while time.time() < deadline and first.poll() is None:
        time.sleep(0.3)
        try:
            complete = [t for t in load(storage, "resume").trials if t.state.name == "COMPLETE"]
        except Exception:  # the study is not created yet
            continue
        if len(complete) >= 2:
            break
    assert first.poll() is None, "the sweep ended before it could be killed"
    first.send_signal(signal.SIGKILL)
    first.wait()
    done_before = {
        t.number: t.params for t in load(storage, "resume").trials if t.state.name == "COMPLETE"
    }
    assert 2 <= len(done_before) < 4

    second = run_cli(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    trials = load(storage, "resume").trials
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 4  # the budget of 4, not 4 more
    for number, params in done_before.items():  # finished trials kept as they were
        assert trials[number].state.name == "COMPLETE" and trials[number].params == params
    assert f"{len(done_before)} of 4 trials finished" in second.stdout + second.stderr
    # nothing finished was run again: each completed parameter set appears once
    keys = [tuple(sorted(t.params.items())) for t in complete]
    assert len(set(keys)) == 4
    # a trial killed while running is marked failed and its parameters are run again
    killed = [t for t in trials if t.state.name == "FAIL" and t.user_attrs["status"] == "launched"]
    for t in killed:
        assert tuple(sorted(t.params.items())) in set(keys)


@STORAGES
def test_two_sweep_processes_share_one_study(tmp_path, subprocess_env, kind):
    storage = storage_url(tmp_path, "shared", kind)
    procs = [
        subprocess.Popen(
            [
                *CLI,
                *sweep_args(
                    tmp_path,
                    f"hydra.sweeper.storage={storage}",
                    "hydra.sweeper.study_name=shared",
                    "hydra.sweeper.n_trials=2",
                    "hydra.sweeper.n_jobs=1",
                    f"hydra.sweeper.worker={worker}",
                    f"hydra.sweeper.sampler.seed={seed}",
                ),
            ],
            cwd=ROOT,
            env=subprocess_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for worker, seed in (("a", 1), ("b", 2))
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    trials = load(storage, "shared").trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    assert sorted(t.user_attrs["sweep_worker"] for t in trials) == ["a", "a", "b", "b"]
    assert len({t.number for t in trials}) == 4


OPEN_AT_ONCE = """
import multiprocessing as mp
import sys

import optuna

from lightning_stl.study_storage import open_study


def open_one(url, barrier, results):
    barrier.wait()  # every process opens the new file at the same moment
    try:
        open_study(url, "race", optuna.samplers.RandomSampler(), ["maximize"])
        results.put("ok")
    except Exception as error:
        results.put(type(error).__name__)


if __name__ == "__main__":
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    ctx = mp.get_context("fork")  # a fresh interpreter without torch: safe to fork
    for attempt in range(int(sys.argv[2])):
        folder = sys.argv[1]
        url = f"sqlite:///{folder}/new{attempt}.db"
        if sys.argv[3] == "journal":
            url = f"journal://{folder}/new{attempt}.log"
        barrier, results = ctx.Barrier(6), ctx.Queue()
        workers = [ctx.Process(target=open_one, args=(url, barrier, results)) for _ in range(6)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        print(" ".join(sorted(results.get() for _ in workers)))
"""


@STORAGES
def test_sweeps_started_together_on_a_new_study_file_all_open_the_study(tmp_path, kind):
    """Optuna stamps a new file's schema in several transactions: without the set-up lock two of
    six processes opening it at once die with IntegrityError / OperationalError."""
    script = tmp_path / "open_at_once.py"
    script.write_text(OPEN_AT_ONCE)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "3", kind],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[:3] == [" ".join(["ok"] * 6)] * 3, result.stdout
    for attempt in range(3):
        assert len(load(storage_url(tmp_path, f"new{attempt}", kind), "race").trials) == 0


@STORAGES
def test_parallel_launcher_runs_trials_at_the_same_time(tmp_path, run_cli, kind):
    result = run_cli(
        *sweep_args(
            tmp_path,
            f"hydra.sweeper.storage={storage_url(tmp_path, 'parallel', kind)}",
            "hydra/launcher=parallel",
            "hydra.launcher.n_jobs=2",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.n_jobs=2",
            "epochs.joint=20",  # long enough that the second worker starts before the first ends
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]

    runs = [json.loads(p.read_text()) for p in tmp_path.glob("sweep_*/trial_*/metrics.json")]
    assert len(runs) == 2
    a, b = runs
    assert a["pid"] != b["pid"]
    assert a["started_at"] < b["ended_at"] and b["started_at"] < a["ended_at"]  # overlapping


@STORAGES
def test_diverging_and_raising_trials(tmp_path, run_cli, kind):
    diverging = run_cli(
        *sweep_args(
            tmp_path,
            f"hydra.sweeper.storage={storage_url(tmp_path, 'failures', kind)}",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.n_jobs=2",
            "optimizer.lr=1e12",
            "optimizer.final_lr=1e12",
            "failure_value=-1",
        )
    )
    assert diverging.returncode == 0, diverging.stderr[-3000:]
    table = next(tmp_path.glob("sweep_*/trials.csv")).read_text()
    assert table.count(",diverged,") == 2 and ",-1.0," in table

    raising = run_cli(
        *sweep_args(
            tmp_path / "raising",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.n_jobs=1",
            "data.target_size=5000",
        )
    )
    assert raising.returncode != 0
    assert "trial 0 failed with parameters" in raising.stdout + raising.stderr
    assert "target_size=5000 exceeds the 997 training images" in raising.stdout + raising.stderr


@pytest.mark.parametrize(
    ("failed", "finished", "final", "stops"),
    [
        (1, 2, False, False),  # n_jobs=2, one trial raised: not a rate yet (it was 1/2 > 0.25)
        (4, 4, False, False),  # fewer than MIN_TRIALS_BEFORE_STOPPING finished
        (2, 8, False, False),  # 0.25 is not more than max_failure_rate=0.25
        (3, 8, False, True),  # over all finished trials, not the last batch
        (3, 5, False, True),
        (1, 2, True, True),  # at the end the rate is judged whatever the count
        (0, 9, True, False),
        (0, 0, True, False),
    ],
)
def test_the_failure_rate_is_judged_over_all_finished_trials(failed, finished, final, stops):
    from lightning_stl.sweeper import MIN_TRIALS_BEFORE_STOPPING, too_many_failures

    assert MIN_TRIALS_BEFORE_STOPPING == 5
    assert too_many_failures(failed, finished, 0.25, final) is stops


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("sqlite:////no/such/dir/study.db", r"the folder /no/such/dir of the SQLite file"),
        ("notaurl", r"ArgumentError: Could not parse SQLAlchemy URL"),
        ("postgresql+nodriver://u@h/db", r"NoSuchModuleError"),
    ],
)
def test_a_storage_that_cannot_be_opened_is_named_in_one_message(url, reason):
    from lightning_stl.study_storage import open_study

    with pytest.raises(ValueError) as caught:
        open_study(url, "s", optuna.samplers.RandomSampler(), ["maximize"])
    message = str(caught.value)
    assert message.startswith(f"hydra.sweeper.storage={url!r} cannot be opened")
    assert re.search(reason, message) and "nothing was run" in message
    assert "\n" not in message and caught.value.__cause__ is None
    assert not Path("/no").exists()  # no folder is made for a wrong path


def make_impl(failure_value: float = 0.0) -> DurableOptunaSweeper:
    return DurableOptunaSweeper(
        None,
        "maximize",
        None,
        None,
        1,
        1,
        0.0,
        None,
        None,
        worker="w",
        failure_value=failure_value,
    )


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_return_values_become_the_failure_value(value, tmp_path):
    ret = JobReturn(
        status=JobStatus.COMPLETED,
        hydra_cfg=OmegaConf.create({"hydra": {"runtime": {"output_dir": str(tmp_path)}}}),
    )
    ret.return_value = value
    told, attrs, error = make_impl(-2.0)._outcome(ret)
    assert told == -2.0 and error is None and attrs["status"] == "non_finite"


def test_raised_errors_are_reported_not_told_as_values(tmp_path, capsys):
    ret = JobReturn(
        status=JobStatus.FAILED,
        hydra_cfg=OmegaConf.create({"hydra": {"runtime": {"output_dir": str(tmp_path)}}}),
    )
    raised = ValueError("tau=0.0 is not allowed")
    ret.return_value = raised
    told, attrs, error = make_impl()._outcome(ret)
    assert told is None and error is raised
    assert attrs["status"] == "failed" and "tau=0.0" in attrs["error"]
    assert capsys.readouterr().err == ""  # the sweep logs the failure, Hydra's line is kept out


def running_trial(study: optuna.Study, worker: str, pid: int) -> optuna.trial.Trial:
    import socket

    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    trial.set_user_attr("sweep_worker", worker)
    trial.set_user_attr("status", "launched")
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", pid)
    return trial


def test_recovery_fails_dead_trials_and_refuses_a_live_namesake():
    study = optuna.create_study(direction="maximize")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    trial = running_trial(study, "w", int(dead.stdout))
    impl = make_impl()
    assert impl._recover(study) == 0
    assert study.trials[trial.number].state.name == "FAIL"
    again = study.ask()  # the killed trial's parameters come back first
    assert again.suggest_float("x", 0.0, 1.0) == study.trials[trial.number].params["x"]
    # ... and are run in the killed trial's folder, so that the run resumes from its last.ckpt
    assert impl.rerun_folders == {
        json.dumps({"x": again.params["x"]}, sort_keys=True): trial.number
    }

    live = optuna.create_study(direction="maximize")
    import os

    running_trial(live, "w", os.getpid())
    with pytest.raises(RuntimeError, match="worker name 'w' is in use by the live process"):
        make_impl()._recover(live)
    running_trial(live, "other", 999_999)  # another worker's trials are not this sweep's to touch


def test_a_trial_killed_while_its_parameters_were_drawn_is_not_run_again():
    """It was never launched: failed, not queued again, and not one of the finished trials."""
    study = optuna.create_study(direction="maximize")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    trial = running_trial(study, "w", int(dead.stdout))
    trial.set_user_attr("status", None)  # its parameters were being drawn: not launched yet
    impl = make_impl()
    assert impl._recover(study) == 0
    assert study.trials[trial.number].state.name == "FAIL" and impl.rerun_folders == {}
    assert study.get_trials(states=[optuna.trial.TrialState.WAITING]) == []
    assert make_impl()._recover(study) == 0  # a later sweep does not count it as finished


def test_a_cross_validated_trial_reports_its_own_wall_time(tmp_path):
    # hparams_search=smile_cv: the trial folder holds cv.json (no metrics.json); its wall time is
    # the trial's, not the whole batch's
    (tmp_path / "cv.json").write_text(
        json.dumps({"objective": 0.8, "best_val_acc": 0.8, "status": "ok", "wall_time_s": 12.5})
    )
    ret = JobReturn(
        status=JobStatus.COMPLETED,
        hydra_cfg=OmegaConf.create({"hydra": {"runtime": {"output_dir": str(tmp_path)}}}),
    )
    ret.return_value = 0.8
    told, attrs, error = make_impl()._outcome(ret)
    assert told == 0.8 and error is None
    assert attrs["wall_time_s"] == 12.5 and attrs["best_val_acc"] == 0.8


def test_the_legend_of_trials_png_hides_no_trial(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from lightning_stl.reporting.sweep_report import plot_trials

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    # the last trial is the worst: lower right, where a legend inside the axes would sit
    points = [(i, 0.9 - 0.02 * i) for i in range(20)]
    plot_trials(points, tmp_path / "trials.png", "maximize")
    (figure,) = figures
    (ax,) = figure.axes
    renderer = figure.canvas.get_renderer()
    legend = ax.get_legend().get_window_extent(renderer)
    assert not legend.overlaps(ax.get_window_extent(renderer))
    plt.close(figure)
