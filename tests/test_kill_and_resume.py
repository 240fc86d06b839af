"""A run killed with SIGKILL at any moment and started again ends exactly as if never stopped.

Each case trains a tiny run in a forked process that kills itself at one moment
(:class:`tests.kill_points.KillAt`): inside an optimiser step, after one, during a validation,
halfway through writing a checkpoint (the best one, or ``last.ckpt`` just after a new best
replaced the previous one), or between a stage's end and its record, in each stage of
``finetune`` and in the source pre-training of ``digits_smile``. The same command is then run
again in the same folder, and its ``metrics.json`` (best step, validation and test accuracy)
and ``target_weight.csv`` must equal those of an uninterrupted run with the same seed.

The default test run checks one case per setting; ``pytest -m slow`` checks them all.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import open_dict

from lightning_stl.run import compose_config, train

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = [
    "data.source_options.num_images=400",
    "data.source_batch_size=16",
    "trainer.enable_progress_bar=false",
    "callbacks=none",
    # a resumable checkpoint every 7 steps: mid-epoch and at epoch ends (an epoch is 25 steps)
    "callbacks.resume_checkpoint.every_n_train_steps=7",
]
SETTINGS = {
    # Smooth Transfer: one stage "joint", 2 epochs of 25 steps, validation at 25 and 50
    "smooth": [*SMALL, "data.target_size=30", "data.target_batch_size=16", "epochs.joint=2"],
    # stages "source" (2 x 25 steps, no validation) and "target" (3 epochs of 2 steps)
    "finetune": [
        *SMALL,
        "method=finetune",
        "data.target_size=30",
        "data.target_batch_size=16",
        "epochs.source=2",
        "epochs.target=3",
    ],
    # pre-training "source" (2 x 25 steps, cached in the run's folder), then SMILE's "target"
    # stage: 40 steps of 2 per epoch, validation every 10
    "digits_smile": [
        *SMALL,
        "+experiment=digits_smile",
        "pretraining.epochs=2",
        "steps.finetune=40",
    ],
}

# (setting, stage, moment, step, write): the moments of tests/kill_points.py
CASES = [
    ("smooth", "joint", "before_optimizer_step", 10, 1),
    ("smooth", "joint", "train_batch_end", 25, 1),  # the end of an epoch, before its validation
    ("smooth", "joint", "validation", 25, 1),
    ("smooth", "joint", "checkpoint_write", 25, 1),  # the new best, half written
    ("smooth", "joint", "checkpoint_write", 50, 2),  # last.ckpt after a new best replaced the old
    ("smooth", "joint", "fit_end", 0, 1),
    ("finetune", "source", "train_batch_end", 30, 1),
    ("finetune", "source", "checkpoint_write", 14, 1),
    ("finetune", "source", "fit_end", 0, 1),
    ("finetune", "target", "validation", 4, 1),
    ("finetune", "target", "checkpoint_write", 6, 1),
    ("digits_smile", "source", "train_batch_end", 30, 1),
    ("digits_smile", "source", "fit_end", 0, 1),
    ("digits_smile", "target", "before_optimizer_step", 25, 1),
    ("digits_smile", "target", "checkpoint_write", 30, 1),
    ("digits_smile", "target", "train_batch_end", 28, 1),  # an epoch end between validations
]
DEFAULT_RUN = {
    ("smooth", "joint", "checkpoint_write", 50, 2),
    ("finetune", "source", "train_batch_end", 30, 1),
    ("digits_smile", "target", "before_optimizer_step", 25, 1),
}


def _train(overrides: list[str], run_dir: Path, data_dir: Path) -> None:
    cfg = compose_config(
        [*overrides, f"pretraining.cache_dir={run_dir}/pretrained"], run_dir, data_dir
    )
    train(cfg)


def run_in_child(overrides: list[str], run_dir: Path, data_dir: Path) -> int:
    """Train in a forked process (no interpreter start-up); its exit code (-9: SIGKILL)."""
    process = multiprocessing.get_context("fork").Process(
        target=_train, args=(overrides, run_dir, data_dir)
    )
    process.start()
    process.join(timeout=300)
    return process.exitcode


def outcome(run_dir: Path) -> dict[str, object]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        **{k: metrics[k] for k in ("best_step", "best_val_acc", "test_acc", "total_steps")},
        "target_weight.csv": (run_dir / "target_weight.csv").read_text(),
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
    """The outcome of each setting run without a kill (computed once, when first asked)."""
    outcomes: dict[str, dict[str, object]] = {}

    def _get(setting: str) -> dict[str, object]:
        if setting not in outcomes:
            run_dir = tmp_path_factory.mktemp(f"uninterrupted_{setting}")
            assert run_in_child(SETTINGS[setting], run_dir, data_dir) == 0
            outcomes[setting] = outcome(run_dir)
        return outcomes[setting]

    return _get


@pytest.mark.parametrize(
    "case",
    [c if c in DEFAULT_RUN else pytest.param(c, marks=pytest.mark.slow) for c in CASES],
    ids=["-".join(map(str, c)) for c in CASES],
)
def test_a_run_killed_at_any_moment_resumes_to_the_uninterrupted_result(
    case, tmp_path, data_dir, uninterrupted
):
    setting, stage, moment, step, write = case
    kill = [
        "+callbacks.kill._target_=tests.kill_points.KillAt",
        f"+callbacks.kill.stage={stage}",
        f"+callbacks.kill.moment={moment}",
        f"+callbacks.kill.step={step}",
        f"+callbacks.kill.write={write}",
    ]
    run_dir = tmp_path / "run"
    assert run_in_child([*SETTINGS[setting], *kill], run_dir, data_dir) == -signal.SIGKILL
    assert not (run_dir / "metrics.json").exists()
    assert run_in_child(SETTINGS[setting], run_dir, data_dir) == 0
    assert outcome(run_dir) == uninterrupted(setting)
    # no partial checkpoint is left under a name that a resume reads
    for path in run_dir.rglob("*.ckpt"):
        torch.load(path, map_location="cpu", weights_only=True)


def _kill(stage: str, moment: str, step: int = 0) -> list[str]:
    return [
        "+callbacks.kill._target_=tests.kill_points.KillAt",
        f"+callbacks.kill.stage={stage}",
        f"+callbacks.kill.moment={moment}",
        f"+callbacks.kill.step={step}",
    ]


def test_a_stage_that_never_validates_keeps_a_checkpoint_of_the_fixed_interval(tmp_path, data_dir):
    # the source stage of finetune validates nothing; killed after its step 30, it has the
    # checkpoint of step 28 (every 7 steps), not none
    run_dir = tmp_path / "run"
    kill = _kill("source", "train_batch_end", 30)
    assert run_in_child([*SETTINGS["finetune"], *kill], run_dir, data_dir) == -signal.SIGKILL
    last = torch.load(
        run_dir / "checkpoints/source/last.ckpt", map_location="cpu", weights_only=True
    )
    assert last["global_step"] == 28
    assert not list((run_dir / "checkpoints/source").glob("best*"))


def test_a_moved_run_folder_resumes_from_its_own_files(tmp_path, data_dir, uninterrupted):
    # killed after the fit, before the stage was recorded: the resumed run only reads the
    # checkpoints' states, whose paths name the folder the run was written in
    first = tmp_path / "first"
    assert run_in_child([*SETTINGS["smooth"], *_kill("joint", "fit_end")], first, data_dir) == -9
    moved = tmp_path / "moved"
    shutil.move(first, moved)
    assert run_in_child(SETTINGS["smooth"], moved, data_dir) == 0
    assert outcome(moved) == uninterrupted("smooth")
    stage = json.loads((moved / "metrics.json").read_text())["stages"][0]
    for key in ("best_model_path", "last_model_path"):
        assert Path(stage[key]).parent == moved / "checkpoints" / "joint", stage[key]


def test_a_recorded_best_that_is_gone_is_chosen_again_instead_of_failing_at_the_end(
    tmp_path, data_dir, uninterrupted
):
    # A kill between the deletion of the previous best and the next last.ckpt leaves a
    # last.ckpt whose best no longer exists. Made here by hand: the best recorded in last.ckpt
    # is a file that is not there, with a score no later validation beats.
    run_dir = tmp_path / "run"
    kill = _kill("joint", "train_batch_end", 30)
    assert run_in_child([*SETTINGS["smooth"], *kill], run_dir, data_dir) == -signal.SIGKILL
    last = run_dir / "checkpoints/joint/last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    (key,) = [k for k in checkpoint["callbacks"] if k.startswith("ModelCheckpoint")]
    gone = str(run_dir / "checkpoints/joint/best-step26.ckpt")
    checkpoint["callbacks"][key].update(
        best_model_path=gone,
        best_model_score=torch.tensor(0.99),
        best_k_models={gone: torch.tensor(0.99)},
        kth_best_model_path=gone,
        kth_value=torch.tensor(0.99),
    )
    torch.save(checkpoint, last)
    assert run_in_child(SETTINGS["smooth"], run_dir, data_dir) == 0
    assert outcome(run_dir) == uninterrupted("smooth")


def test_a_finished_run_reports_again_without_any_last_checkpoint(
    tmp_path, data_dir, uninterrupted
):
    run_dir = tmp_path / "run"
    assert run_in_child(SETTINGS["finetune"], run_dir, data_dir) == 0
    first = outcome(run_dir)
    assert first == uninterrupted("finetune")
    for last in run_dir.rglob("last.ckpt"):
        last.unlink()
    (run_dir / "metrics.json").unlink()
    assert run_in_child(SETTINGS["finetune"], run_dir, data_dir) == 0
    assert outcome(run_dir) == first


class ValidationProbe(L.Callback):
    """Records, at each batch end, whether ResumeCheckpoint expects a validation next, and the
    steps at which validations really ran."""

    expected: list[int] = []
    validated: list[int] = []

    def on_train_batch_end(self, trainer, *args) -> None:
        from lightning_stl.callbacks.resume_checkpoint import _validates_after_this_batch

        if _validates_after_this_batch(trainer):
            ValidationProbe.expected.append(trainer.global_step)

    def on_validation_start(self, trainer, *args) -> None:
        ValidationProbe.validated.append(trainer.global_step)


@pytest.mark.parametrize(
    "overrides",
    [
        ["epochs.joint=3"],  # once an epoch (7 steps)
        ["+experiment=digits_smile", "pretraining.on_source=false", "steps.finetune=25"],
    ],
    ids=["every-epoch", "every-5-epochs-and-max-steps"],
)
def test_the_resume_checkpoint_knows_which_steps_validate(make_cfg, overrides):
    # it leans on Lightning's private rule (_should_check_val_fx): this fails if that changes
    ValidationProbe.expected, ValidationProbe.validated = [], []
    cfg = make_cfg(
        *overrides, "+callbacks.probe._target_=tests.test_kill_and_resume.ValidationProbe"
    )
    if "+experiment=digits_smile" in overrides:
        with open_dict(cfg):
            cfg.method.module.feature_mixup_weight = 0.0  # no teacher: no source model needed
            cfg.method.module.label_mixup_weight = 0.0
            cfg.method.callbacks = None
    train(cfg)
    assert ValidationProbe.validated and ValidationProbe.expected == ValidationProbe.validated
