"""The multi-fidelity search: short runs of one ω (run_fraction) and the sweep that climbs them
(hydra.sweeper.fidelity + an Optuna pruner)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from lightning_stl.run import compose_config, train
from lightning_stl.run_fraction import shorten
from lightning_stl.schedule import SigmoidTargetWeight
from lightning_stl.sweep_recovery import recover
from lightning_stl.sweeper import DurableOptunaSweeper

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- run_fraction


@pytest.mark.parametrize(
    "total, interval, fraction, steps, every",
    [
        (2370, 79, 0.125, 300, 10),  # the digits default: 30 validations of 10 steps
        (2370, 79, 0.25, 600, 20),
        (2370, 79, 0.5, 1200, 40),  # 1185 / 30 = 39.5, rounded half up
        (200, 1, 0.125, 25, 1),  # an epoch of one step: validate every step
        (600, 10, 0.25, 180, 3),  # SMILE: 600 iterations validated every 10 -> 60 of 3 (2.5)
        (100, 30, 0.5, 51, 17),  # the full run's 3 validations (⌊100 / 30⌋) of round(50 / 3)
        (250, 100, 0.5, 126, 63),  # 2 validations, not round(2.5) = 3
        (2370, None, 0.125, 296, None),  # a stage without validation: round(296.25)
        (5, 5, 0.01, 1, 1),  # never below one step
    ],
)
def test_a_shortened_stage_keeps_its_validations_at_the_same_relative_steps(
    total, interval, fraction, steps, every
):
    short = shorten(total, interval, fraction)
    assert (short.max_steps, short.val_check_interval) == (steps, every)
    if interval is not None:
        assert short.max_steps % short.val_check_interval == 0  # the last step validates


TINY = [
    "+experiment=digits",
    "data.source_options.num_images=400",
    "data.source_batch_size=64",
    "data.target_batch_size=64",
    "data.target_size=30",
    "epochs.joint=6",  # 7 steps an epoch (400 / 64), T = 42
    "callbacks=none",
    "trainer.enable_progress_bar=false",
    "torch_threads=1",
    "method.target_weight.tau=0.1",
]


def validated_steps(run_dir: Path) -> list[int]:
    (path,) = run_dir.glob("csv/*/metrics.csv")
    with path.open() as handle:
        return [int(float(r["run_step"])) for r in csv.DictReader(handle) if r.get("val/acc")]


def test_a_quarter_run_trains_a_quarter_of_T_with_the_same_relative_schedule(tmp_path, data_dir):
    full = train(compose_config(TINY, tmp_path / "full", data_dir))
    quarter = train(compose_config([*TINY, "run_fraction=0.25"], tmp_path / "quarter", data_dir))
    assert full["total_steps"] == 42 and validated_steps(tmp_path / "full") == list(range(7, 43, 7))
    # shorten(42, 7, 0.25): the full run's 6 validations, every round(10.5 / 6) = 2 steps
    assert quarter["total_steps"] == 12 and quarter["run_fraction"] == 0.25
    assert validated_steps(tmp_path / "quarter") == [2, 4, 6, 8, 10, 12]
    # λ(t) is the full run's curve compressed: Eq. 4 at t of T = 12
    schedule = SigmoidTargetWeight(t0=0.0, tau=0.1, alpha=0.0, relative=True)
    with (tmp_path / "quarter" / "target_weight.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == list(range(1, 13))
    for row in rows:
        assert float(row["target_weight"]) == pytest.approx(schedule(int(row["step"]), 12))


def test_a_shortened_run_counts_optimiser_steps_under_gradient_accumulation(tmp_path, data_dir):
    overrides = [*TINY, "data.source_options.num_images=384", "epochs.joint=8"]
    overrides += ["+trainer.accumulate_grad_batches=2", "run_fraction=0.5"]
    # 6 batches an epoch = 3 optimiser steps, T = 24 validated 8 times; half: 8 validations of
    # round(12 / 8) = 2 steps (4 batches)
    summary = train(compose_config(overrides, tmp_path, data_dir))
    assert summary["total_steps"] == 16
    assert validated_steps(tmp_path) == list(range(2, 17, 2))


def test_a_short_run_reads_the_full_source_pretraining_it_shares_with_full_runs(tmp_path, data_dir):
    """run_fraction shortens the run, never the cached source pre-training it starts from."""
    smile = [
        "+experiment=digits_smile",
        "data.source_options.num_images=400",  # 7 source steps an epoch
        "data.source_batch_size=64",
        "data.target_size=30",
        "pretraining.epochs=2",
        f"pretraining.cache_dir={tmp_path / 'pretrained'}",
        "steps.finetune=8",
        "val_every_n_steps=2",
        "callbacks=none",
        "trainer.enable_progress_bar=false",
        "speed.fast_mode=false",
    ]
    short = train(compose_config([*smile, "run_fraction=0.5"], tmp_path / "short", data_dir))
    assert short["stages"][-1]["total_steps"] == 4
    (last,) = (tmp_path / "pretrained").glob("*/checkpoints/source/last.ckpt")
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 14
    stamp = last.stat().st_mtime
    train(compose_config(smile, tmp_path / "full", data_dir))
    assert list((tmp_path / "pretrained").glob("*/checkpoints/source/last.ckpt")) == [last]
    assert last.stat().st_mtime == stamp  # the full run read the short run's pre-training


# ---------------------------------------------------------------- the sweep's rungs


class ScriptedLauncher:
    """A launcher whose jobs return a known function of their overrides, and a log of them."""

    def __init__(self, objective):
        self.objective = objective
        self.launched: list[dict[str, str]] = []

    def launch(self, job_overrides, initial_job_idx):
        returns = []
        for overrides in job_overrides:
            values = dict(o.split("=", 1) for o in overrides)
            self.launched.append(values)
            ret = JobReturn(status=JobStatus.COMPLETED, overrides=list(overrides))
            ret.return_value = self.objective(values)
            returns.append(ret)
        return returns


def objective(values: dict[str, str]) -> float:
    """Accuracy that grows with the run fraction; ω's x decides the rank, with a twist at
    length: a higher x wins short runs, an x near 0.7 wins the full one."""
    x, fraction = float(values["x"]), float(values["run_fraction"])
    return fraction * (1 - abs(x - 0.7)) if fraction == 1.0 else fraction * x


def rung_sweeper(tmp_path: Path, n_trials: int, n_jobs: int, eta: int = 2):
    sweeper = DurableOptunaSweeper(
        optuna.samplers.RandomSampler(seed=0),
        "maximize",
        None,
        "rungs",
        n_trials,
        n_jobs,
        0.0,
        None,
        OmegaConf.create({"x": "interval(0.0, 1.0)"}),
        worker="w",
        pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=eta),
        fidelity=OmegaConf.create({"key": "run_fraction", "rungs": [0.25, 0.5, 1.0]}),
    )
    sweeper.config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    sweeper.launcher = ScriptedLauncher(objective)
    return sweeper


def asha_decisions(launched: list[dict[str, str]], eta: int) -> dict[tuple[str, float], bool]:
    """Independently, which (trial, rung) ASHA promotes: a value climbs if it is among the best
    max(1, ⌊n/η⌋) of the n values its rung has seen so far, itself included, in launch order."""
    seen: dict[float, list[float]] = {}
    decisions = {}
    for values in launched:
        fraction = float(values["run_fraction"])
        if fraction == 1.0:
            continue
        value = objective(values)
        seen.setdefault(fraction, []).append(value)
        ranked = sorted(seen[fraction], reverse=True)
        decisions[(values["+optuna_trial"], fraction)] = (
            value >= ranked[max(1, len(ranked) // eta) - 1]
        )
    return decisions


@pytest.mark.parametrize("n_jobs", [1, 3])
def test_trials_climb_the_rungs_by_the_pruners_rule_and_only_full_runs_complete(tmp_path, n_jobs):
    sweeper = rung_sweeper(tmp_path, n_trials=9, n_jobs=n_jobs)
    sweeper.sweep([])
    launched = sweeper.launcher.launched
    by_trial: dict[str, list[dict[str, str]]] = {}
    for values in launched:
        by_trial.setdefault(values["+optuna_trial"], []).append(values)
    assert len(by_trial) == 9  # n_trials counts ω, not runs
    for runs in by_trial.values():
        fractions = [float(v["run_fraction"]) for v in runs]
        assert fractions == [0.25, 0.5, 1.0][: len(fractions)]  # a prefix, in order
        assert len({v["x"] for v in runs}) == 1  # one ω for every rung, in one folder number
    decisions = asha_decisions(launched, eta=2)
    for (trial, fraction), climbs in decisions.items():
        next_rung = {0.25: 0.5, 0.5: 1.0}[fraction]
        assert any(float(v["run_fraction"]) == next_rung for v in by_trial[trial]) == climbs
    assert 0 < sum(decisions.values()) < len(decisions)  # some climbed, some were stopped


def test_the_best_trial_is_a_full_length_result_and_pruned_trials_keep_their_rung_value(
    tmp_path, monkeypatch
):
    from lightning_stl import sweeper as sweeper_module

    sweeper = rung_sweeper(tmp_path, n_trials=8, n_jobs=4)
    opened = {}

    def keep(*args):
        opened["study"] = real_open(*args)
        return opened["study"]

    real_open = sweeper_module.open_study
    monkeypatch.setattr(sweeper_module, "open_study", keep)
    sweeper.sweep([])
    study = opened["study"]
    states = {t.state.name for t in study.trials}
    assert states == {"COMPLETE", "PRUNED"}
    for t in study.trials:
        x = t.params["x"]
        if t.state.name == "COMPLETE":
            assert t.user_attrs["run_fraction"] == 1.0
            assert t.value == pytest.approx(1.0 * (1 - abs(x - 0.7)))
        else:
            fraction = t.user_attrs["run_fraction"]
            assert fraction < 1.0 and t.value == pytest.approx(fraction * x)
    assert study.best_trial.user_attrs["run_fraction"] == 1.0
    assert (tmp_path / "trials.csv").exists()


def test_a_trial_killed_between_two_rungs_climbs_again_from_its_folder():
    """Its last rung finished (status ok), its next was not launched: queued again, same folder."""
    study = optuna.create_study(direction="maximize")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    import socket

    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    for key, value in {
        "sweep_worker": "w",
        "status": "ok",
        "host": socket.gethostname(),
        "pid": int(dead.stdout),
    }.items():
        trial.set_user_attr(key, value)
    trial.report(0.5, 1)
    sweeper = DurableOptunaSweeper(None, "maximize", None, None, 1, 1, 0.0, None, None, worker="w")
    assert sweeper._recover(study) == 0
    assert study.trials[trial.number].state.name == "FAIL"
    assert sweeper.rerun_folders == {json.dumps(trial.params, sort_keys=True): trial.number}


class Killed(Exception):
    """The sweep process dying mid-launch."""


class DyingLauncher(ScriptedLauncher):
    """A scripted launcher whose process dies during its ``die_at``-th job."""

    def __init__(self, objective, die_at: int):
        super().__init__(objective)
        self.die_at = die_at

    def launch(self, job_overrides, initial_job_idx):
        if len(self.launched) + len(job_overrides) >= self.die_at:
            self.launched.append(dict(o.split("=", 1) for o in job_overrides[0]))
            raise Killed
        return super().launch(job_overrides, initial_job_idx)


def mark_dead(study: optuna.Study) -> None:
    """What a killed process leaves: its RUNNING trials name a pid that no longer exists."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True)  # fmt: skip
    for trial in study.get_trials(states=[optuna.trial.TrialState.RUNNING]):
        study._storage.set_trial_user_attr(trial._trial_id, "pid", int(dead.stdout))


def test_a_rung_sweep_killed_mid_run_goes_on_with_the_same_trial_in_the_same_folder(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    first = rung_sweeper(tmp_path, n_trials=6, n_jobs=1)
    first.storage, first.launcher = storage, DyingLauncher(objective, die_at=5)
    with pytest.raises(Killed):
        first.sweep([])
    study = optuna.load_study(study_name="rungs", storage=storage)
    (killed,) = study.get_trials(states=[optuna.trial.TrialState.RUNNING])
    dying = first.launcher.launched[-1]
    mark_dead(study)

    second = rung_sweeper(tmp_path, n_trials=6, n_jobs=1)
    second.storage = storage
    second.sweep([])
    again = second.launcher.launched[0]
    assert again == dying  # the same ω, rung and folder: its run resumes from its last.ckpt
    assert again["+optuna_trial"] == str(killed.number)
    study = optuna.load_study(study_name="rungs", storage=storage)
    assert len(study.trials) == 6  # the killed trial went on: no trial was added for it
    assert {t.state.name for t in study.trials} <= {"COMPLETE", "PRUNED"}
    runs = [(v["+optuna_trial"], v["run_fraction"]) for v in first.launcher.launched[:-1]]
    runs += [(v["+optuna_trial"], v["run_fraction"]) for v in second.launcher.launched]
    assert len(runs) == len(set(runs))  # nothing that finished was run again
    assert len({folder for folder, _ in runs}) == 6


def reported_study(values) -> tuple[optuna.Study, list[optuna.Trial]]:
    """A successive-halving study with one trial of worker "w" per value, each with its first
    rung's value reported (status ok), not yet decided: what a sweep leaves between two rungs."""
    import socket

    study = optuna.create_study(
        direction="maximize",
        pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2),
    )
    trials = []
    for value in values:
        trial = study.ask()
        trial.suggest_float("x", 0.0, 1.0)
        for key, item in {
            "sweep_worker": "w",
            "status": "ok",
            "host": socket.gethostname(),
        }.items():
            trial.set_user_attr(key, item)
        trial.report(value, 1)
        trials.append(trial)
    return study, trials


def test_a_rung_trial_killed_after_its_rung_was_reported_climbs_on_or_is_pruned_now(tmp_path):
    """Killed between its rung's report and the pruner's decision: the decision is made first."""
    study, _ = reported_study((0.9, 0.1))  # a second trial that the first outranks at rung 0
    mark_dead(study)
    found = recover(study, "w", rungs=3)
    assert [(t.number, rung) for t, rung in found.resumed] == [(0, 1)]
    assert study.trials[1].state.name == "PRUNED" and found.finished == 1


@pytest.mark.parametrize(
    "status, value, asked, resumed",
    [
        ("ok", 0.1, True, False),  # the pruner said "prune", the sweep died before telling it
        ("promoted", 0.95, True, True),  # said "climb": goes on, not asked again
        ("diverged", 0.95, False, False),  # a diverged run never climbs, whatever its value
    ],
)
def test_a_verdict_made_before_a_kill_is_kept(status, value, asked, resumed):
    study, trials = reported_study((0.9, value))
    assert trials[0].should_prune() is False
    study.tell(trials[0], state=optuna.trial.TrialState.PRUNED)  # out of the way
    if asked:
        assert trials[1].should_prune() is (value < 0.9)  # then the process dies
    trials[1].set_user_attr("status", status)
    mark_dead(study)
    found = recover(study, "w", rungs=3)
    assert [(t.number, rung) for t, rung in found.resumed] == ([(1, 1)] if resumed else [])
    assert study.trials[1].state.name == ("RUNNING" if resumed else "PRUNED")


@pytest.mark.parametrize(
    "rungs, message",
    [
        ([0.5, 0.25, 1.0], "increasing fractions"),
        ([0.25, 0.5], "ending with 1.0"),
        ([0.0, 1.0], "run_fraction=0.0 is not allowed"),
        ([0.4, 0.5, 1.0], r"these give \[1, 1, 2\]"),
    ],
)
def test_bad_rungs_are_refused_with_one_message(rungs, message):
    with pytest.raises(ValueError, match=message):
        DurableOptunaSweeper(
            None,
            "maximize",
            None,
            None,
            1,
            1,
            0.0,
            None,
            None,
            pruner=optuna.pruners.SuccessiveHalvingPruner(),
            fidelity=OmegaConf.create({"rungs": rungs}),
        )


def test_rungs_without_a_pruner_are_refused():
    with pytest.raises(ValueError, match="without a pruner"):
        DurableOptunaSweeper(
            None, "maximize", None, None, 1, 1, 0.0, None, None,
            fidelity=OmegaConf.create({"rungs": [0.5, 1.0]}),
        )  # fmt: skip


def test_smooth_asha_runs_end_to_end_on_the_command_line(tmp_path, run_cli):
    result = run_cli(
        "-m",
        "hparams_search=smooth_asha",
        *[a for a in TINY if not a.startswith("method.")],
        "epochs.joint=4",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.n_jobs=2",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with (tmp_path / "trials.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and {r["state"] for r in rows} <= {"COMPLETE", "PRUNED"}
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    assert complete  # the first trial at each rung always climbs (ASHA)
    for row in complete:
        metrics = json.loads((Path(row["run_dir"]) / "metrics.json").read_text())
        assert metrics["run_fraction"] == 1.0 and metrics["total_steps"] == 28
        assert math.isclose(float(row["value"]), metrics["best_val_acc"])
    for row in rows:
        folder = tmp_path / f"trial_{row['trial']}"
        assert (folder / "run_fraction_0.125" / "metrics.json").exists()
