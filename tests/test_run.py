"""End-to-end runs of the entry point on the embedded digits pair, with tiny settings."""

from __future__ import annotations

import csv
import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import HydraException, MissingConfigException
from omegaconf import open_dict

from lightning_stl.data import DatasetNotFoundError
from lightning_stl.methods import SmoothTransfer
from lightning_stl.run import train
from tests.checkpoint_accuracy import checkpoint_test_accuracy
from tests.conftest import final_state
from tests.figure_pixels import AxesBox, assert_curve_through, colour_mask, read_rgb, vertical_lines

ROOT = Path(__file__).resolve().parents[1]


def read_weights(run_dir: Path) -> list[tuple[str, int, float]]:
    with open(run_dir / "target_weight.csv") as handle:
        return [
            (r["stage"], int(r["step"]), float(r["target_weight"])) for r in csv.DictReader(handle)
        ]


def test_main_entry_point_trains_tests_and_writes_its_files(tmp_path, run_cli):
    run_dir = tmp_path / "cli"
    from tests.conftest import TINY

    result = run_cli(*TINY, f"hydra.run.dir={run_dir}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "target test accuracy (best-validation checkpoint" in result.stdout
    # what a user reads: no adverts, no deprecation noise, the device banner once
    console = result.stdout + result.stderr
    assert "💡" not in console and "LeafSpec" not in console, console[-3000:]
    assert console.count("GPU available:") == 1, console[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["method"] == "smooth" and metrics["target_size"] == 30
    assert 0.0 <= metrics["test_acc"] <= 1.0 and 0.0 <= metrics["best_val_acc"] <= 1.0
    assert metrics["target_weight"][0]["schedule"] == "sigmoid"
    assert metrics["wall_time_s"] > 0
    rows = read_weights(run_dir)
    # 400 source images / 64 = 7 steps per epoch, 2 epochs
    assert [r[1] for r in rows] == list(range(1, metrics["total_steps"] + 1))
    assert metrics["total_steps"] == 14
    assert 1 <= metrics["best_step"] <= 14 and metrics["best_step"] % 7 == 0
    # the figure shows λ(t) of target_weight.csv (red, x from 0 to the last step, y from -0.03
    # to 1.03) and the best-validation step (a dashed blue vertical line)
    rgb = read_rgb(run_dir / "target_weight.png")
    box = AxesBox.find(rgb)
    xlim, ylim = (0, metrics["total_steps"]), (-0.03, 1.03)
    curve = box.inside(colour_mask(rgb, "tab:red"))
    assert_curve_through(curve, box, [(t, w) for _, t, w in rows], xlim, ylim)
    (best_line,) = vertical_lines(colour_mask(rgb, "tab:blue"), box)
    assert abs(best_line - box.column(metrics["best_step"], xlim)) <= 2
    assert (run_dir / ".hydra" / "config.yaml").exists()
    assert (run_dir / "csv" / "joint" / "metrics.csv").exists()


def test_applied_weights_follow_eq4(make_cfg):
    cfg = make_cfg(
        "method.target_weight.t0=0.1",
        "method.target_weight.tau=0.07",
        "method.target_weight.alpha=0.3",
    )
    metrics = train(cfg)
    T = metrics["total_steps"]
    for _, t, weight in read_weights(Path(cfg.paths.output_dir)):
        expected = 1 / (1 + math.exp(-(t - T / 2 - 0.1 * T) / (0.07 * T) + 0.3))
        assert weight == pytest.approx(expected, rel=1e-12)


def test_tau_to_zero_reproduces_the_step_schedule_exactly(make_cfg, tmp_path):
    smooth = make_cfg(
        "method.target_weight.tau=1e-9", "method.target_weight.t0=0.05", output_dir=tmp_path / "a"
    )
    step = make_cfg(
        "method.target_weight._target_=tests.conftest.StepTargetWeight",
        "~method.target_weight.tau",
        "method.target_weight.t0=0.05",
        output_dir=tmp_path / "b",
    )
    m_smooth, m_step = train(smooth), train(step)
    w_smooth, w_step = read_weights(tmp_path / "a"), read_weights(tmp_path / "b")
    assert w_smooth == w_step
    assert {w for *_, w in w_smooth} == {0.0, 1.0}
    a, b = final_state(tmp_path / "a", "joint"), final_state(tmp_path / "b", "joint")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert m_smooth["test_acc"] == m_step["test_acc"]


def test_tau_to_infinity_reproduces_the_constant_schedule_exactly(make_cfg, tmp_path):
    alpha = 0.8
    smooth = make_cfg(
        "method.target_weight.tau=inf",
        f"method.target_weight.alpha={alpha}",
        output_dir=tmp_path / "a",
    )
    constant = make_cfg(
        "method=multitask",
        f"method.weight={1 / (1 + math.exp(alpha))!r}",
        output_dir=tmp_path / "b",
    )
    train(smooth), train(constant)
    w_smooth, w_const = read_weights(tmp_path / "a"), read_weights(tmp_path / "b")
    assert [w for *_, w in w_smooth] == [w for *_, w in w_const]
    a, b = final_state(tmp_path / "a", "joint"), final_state(tmp_path / "b", "joint")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    strict = json.loads((tmp_path / "a" / "metrics.json").read_text(), parse_constant=pytest.fail)
    assert strict["target_weight"][0]["tau"] == "inf"


def test_target_only_trains_on_epochs_of_the_target(make_cfg):
    cfg = make_cfg("method=target_only")
    metrics = train(cfg)
    # N = 30 with a sub-batch of 64: one step per epoch
    assert metrics["total_steps"] == 2
    assert [w for *_, w in read_weights(Path(cfg.paths.output_dir))] == [1.0, 1.0]


def test_finetune_trains_the_source_then_the_target(make_cfg):
    cfg = make_cfg("method=finetune", "batchnorm=per_domain")
    metrics = train(cfg)
    rows = read_weights(Path(cfg.paths.output_dir))
    stages = [r[0] for r in rows]
    assert stages == ["source"] * 14 + ["target"] * 2
    assert [r[2] for r in rows] == [0.0] * 14 + [1.0] * 2
    assert [r[1] for r in rows] == list(range(1, 17))
    assert metrics["best_step"] > 14  # tested checkpoint comes from the fine-tuning stage
    # ... and is named by the step of the whole run, as metrics.json counts it
    best = Path(metrics["stages"][-1]["best_model_path"]).name
    assert best == f"best-step{metrics['best_step']}.ckpt"
    src = final_state(Path(cfg.paths.output_dir), "source")
    tgt = final_state(Path(cfg.paths.output_dir), "target")
    # the fine-tuning stage started from the source stage's backbone, not from scratch
    name = next(k for k in src if k.startswith("model.backbone") and k.endswith("weight"))
    assert not torch.equal(src[name], tgt[name])
    assert (src[name] - tgt[name]).abs().mean() < src[name].abs().mean()


def test_zero_weighted_sub_batch_costs_no_forward_or_backward(make_cfg, monkeypatch):
    seen = []
    from lightning_stl.models.source_target import SourceTargetClassifier

    original = SourceTargetClassifier.forward

    def spy(self, target_x=None, source_x=None):
        if self.training:
            seen.append((target_x is not None, source_x is not None))
        return original(self, target_x, source_x)

    monkeypatch.setattr(SourceTargetClassifier, "forward", spy)
    train(make_cfg("method.target_weight.tau=1e-9", "method.target_weight.t0=0.05"))
    assert seen[:7] == [(False, True)] * 7 and seen[7:] == [(True, False)] * 7


def test_per_domain_checkpoint_round_trip(make_cfg):
    cfg = make_cfg("batchnorm=per_domain")
    train(cfg)
    path = Path(cfg.paths.output_dir) / "checkpoints" / "joint" / "last.ckpt"
    module = SmoothTransfer.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert any(k.endswith("source_running_mean") for k in state)
    for name, value in module.state_dict().items():
        assert torch.equal(value, state[name]), name
    norm = next(m for m in module.modules() if type(m).__name__ == "DomainBatchNorm")
    assert not torch.equal(norm.norm.running_mean, norm.source_running_mean)


def test_the_seed_alone_decides_the_run(make_cfg, tmp_path):
    runs = {
        name: train(make_cfg(*overrides, output_dir=tmp_path / name))
        for name, overrides in (
            ("a", []),
            ("again", []),
            ("seed1", ["seed=1", "data.subset_seed=0"]),  # the same N images, another seed
        )
    }
    states = {name: final_state(tmp_path / name, "joint") for name in runs}
    # the same seed, run again in the same process (whose random state the first run moved):
    # the same weights, so the same metrics
    assert [k for k in states["a"] if not torch.equal(states["a"][k], states["again"][k])] == []
    for key in ("best_val_acc", "best_step", "test_acc"):
        assert runs["a"][key] == runs["again"][key]
    # ... and it is the seed that makes them so: another seed, other initial weights and batch
    # order, so other weights
    weights = [k for k, v in states["a"].items() if v.is_floating_point()]
    assert all(not torch.equal(states["a"][k], states["seed1"][k]) for k in weights)


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path, subprocess_env):
    run_dir = tmp_path / "resume"
    args = [
        sys.executable,
        "-m",
        "lightning_stl.run",
        "data.source_options.num_images=400",
        "data.target_size=30",
        "data.source_batch_size=16",
        "data.target_batch_size=16",
        "epochs.joint=40",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
    ]
    first = subprocess.Popen(
        args, cwd=ROOT, env=subprocess_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    last = run_dir / "checkpoints" / "joint" / "last.ckpt"
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None:
        if last.exists():
            step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
            if step >= 50:
                break
        time.sleep(0.2)
    assert first.poll() is None, "the first run ended before it could be killed"
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert 0 < killed_at < 1000 and not (run_dir / "metrics.json").exists()

    second = subprocess.run(
        args, cwd=ROOT, env=subprocess_env, capture_output=True, text=True, timeout=600
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Restoring states from the checkpoint path" in second.stderr + second.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["total_steps"] == 25 * 40
    rows = read_weights(run_dir)
    assert [r[1] for r in rows] == list(
        range(1, 1001)
    )  # the whole curve, before and after the kill
    # the CSV log keeps the validations made before the kill, and logs each one once
    with open(run_dir / "csv" / "joint" / "metrics.csv", newline="") as handle:
        validated = [int(r["step"]) for r in csv.DictReader(handle) if r.get("val/acc")]
    assert validated == sorted(set(validated)) and validated[-1] == 999
    assert validated[0] < killed_at - 25  # an epoch (25 steps) before the checkpoint it resumed
    assert len(validated) == 40  # one validation per epoch


@pytest.mark.parametrize(
    ("overrides", "error", "pattern"),
    [
        (["method.target_weight.tau=0"], ValueError, r"tau=0.0 is not allowed.*> 0"),
        (["method.target_weight.tau=-2"], ValueError, r"tau=-2.0 is not allowed"),
        (
            ["data.target_size=5000"],
            ValueError,
            r"target_size=5000 exceeds the 997 training images of digits",
        ),
        (["data.target_size=0"], ValueError, r"target_size=0 is not allowed.*>= 1"),
        (
            ["data.target=digitz"],
            ValueError,
            r"unknown data set 'digitz'; known data sets: .*digits",
        ),
        (["backbone.name=resnet2O"], ValueError, r"resnet2O.*resnet20"),
        (["data.target_batch_size=0"], ValueError, r"target_batch_size=0 is not allowed.*> 0"),
        (["data.source_batch_size=-4"], ValueError, r"source_batch_size=-4 is not allowed"),
        (["batchnorm=domain"], ValueError, r"batchnorm='domain' is not allowed"),
    ],
)
def test_bad_input_stops_before_training_with_a_clear_message(make_cfg, overrides, error, pattern):
    cfg = make_cfg(*overrides)
    with pytest.raises(Exception) as info:
        train(cfg)
    # Hydra's instantiate wraps constructor errors; the message of the cause must say it all
    chain, exc = [], info.value
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__
    assert any(isinstance(e, error) for e in chain)
    assert any(__import__("re").search(pattern, str(e)) for e in chain), [str(e) for e in chain]
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


def test_unknown_method_names_the_allowed_ones(make_cfg):
    with pytest.raises((MissingConfigException, HydraException), match=r"(?s)method/smoth.*smooth"):
        make_cfg("method=smoth")


def test_missing_data_with_download_off_names_folder_and_flag(make_cfg, tmp_path):
    cfg = make_cfg("+experiment=svhn_mnist", tiny=False)
    with open_dict(cfg):
        cfg.data.root = str(tmp_path / "empty")
    with pytest.raises(Exception) as info:
        train(cfg)
    exc = info.value
    while exc is not None and not isinstance(exc, DatasetNotFoundError):
        exc = exc.__cause__ or exc.__context__
    assert isinstance(exc, DatasetNotFoundError)
    assert (
        "train_32x32.mat" in str(exc) and "data.download=true" in str(exc) and "empty" in str(exc)
    )


def test_paper_experiment_configs_carry_the_appendix_settings(make_cfg):
    svhn = make_cfg("+experiment=svhn_mnist", tiny=False)
    assert (svhn.data.target, svhn.data.source, svhn.backbone.name) == ("svhn", "mnist", "wrn10_2")
    assert svhn.batchnorm == "per_domain" and svhn.backbone.options.drop_rate == 0.4
    assert (svhn.epochs.joint, svhn.epochs.source, svhn.epochs.target) == (336, 160, 160)
    assert (svhn.optimizer.lr, svhn.optimizer.final_lr, svhn.optimizer.weight_decay) == (
        1e-2,
        1e-4,
        5e-4,
    )
    assert dict(svhn.data.source_options) == {"image_size": 32, "channels": 3}
    cifar = make_cfg("+experiment=cifar10_cifar100", tiny=False)
    assert (cifar.data.target, cifar.data.source, cifar.backbone.name) == (
        "cifar10",
        "cifar100",
        "resnet20",
    )
    assert cifar.batchnorm == "shared" and (
        cifar.epochs.joint,
        cifar.epochs.source,
        cifar.epochs.target,
    ) == (380, 200, 200)
    assert (cifar.optimizer.lr, cifar.optimizer.final_lr, cifar.optimizer.weight_decay) == (
        0.1,
        1e-3,
        1e-4,
    )
    for cfg in (svhn, cifar):
        assert cfg.optimizer.momentum == 0.9 and cfg.optimizer.warmup_fraction == 0.025
        assert cfg.data.target_batch_size == cfg.data.source_batch_size == 128
    assert np.isclose(cifar.optimizer.lr, 0.1)


def test_a_diverging_run_stops_and_reports_a_finite_worst_value(make_cfg):
    cfg = make_cfg(
        "optimizer.lr=1e12", "optimizer.final_lr=1e12", "epochs.joint=3", "failure_value=-1.0"
    )
    metrics = train(cfg)
    assert metrics["status"] == "diverged" and metrics["objective"] == -1.0
    stage = metrics["stages"][0]
    assert stage["diverged_at_step"] is not None
    steps_run = len(read_weights(Path(cfg.paths.output_dir)))
    assert steps_run == stage["diverged_at_step"] < 21  # stopped before the 3 epochs of 7 steps
    json.loads(
        (Path(cfg.paths.output_dir) / "metrics.json").read_text(), parse_constant=pytest.fail
    )


def test_a_diverged_single_run_says_so_last_and_exits_non_zero(tmp_path, run_cli):
    """Outside a sweep a diverged run is a failure: exit code 1 and its reason on the last line
    (a sweep instead records failure_value and goes on: tests/test_sweeps.py)."""
    from tests.conftest import TINY

    result = run_cli(
        *TINY,
        "optimizer.lr=1e12",
        "optimizer.final_lr=1e12",
        "epochs.joint=3",
        f"hydra.run.dir={tmp_path / 'diverged'}",
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the run diverged at step ") and "optimizer.lr" in last
    assert "Traceback" not in result.stderr
    metrics = json.loads((tmp_path / "diverged" / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and metrics["objective"] == 0.0


def test_ddp_run_on_two_cpu_processes(tmp_path, run_cli, make_cfg):
    run_dir = tmp_path / "ddp"
    result = run_cli(
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "method=finetune",  # each stage leaves one head unused
        "data.source_options.num_images=400",
        "epochs.source=6",  # enough steps for a model above chance: its accuracy tells
        "epochs.target=4",  # checkpoints and test-set parts apart
        "trainer.enable_progress_bar=false",
        "speed.fast_mode=false",  # float32, as the check below recomputes it
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # source stage: 400 images / (128 per process x 2 processes) = 2 steps per epoch; target
    # stage: 50 images / (128 x 2) = 1 step per epoch
    assert metrics["status"] == "ok" and metrics["total_steps"] == 6 * 2 + 4 * 1
    # the test accuracy is that of the best checkpoint over the whole test set, counted here in
    # one process (not one process's share of the test images, nor another checkpoint's)
    assert metrics["test_acc"] > 0.15  # above chance (0.1): the comparison tells runs apart
    cfg = make_cfg("data.source_options.num_images=400", tiny=False)
    best = metrics["stages"][-1]["best_model_path"]
    assert metrics["test_acc"] == pytest.approx(
        checkpoint_test_accuracy(cfg, best, SmoothTransfer), abs=1e-6
    )


def test_resuming_a_folder_of_other_settings_is_refused(make_cfg, tmp_path):
    train(make_cfg(output_dir=tmp_path / "same"))
    train(make_cfg(output_dir=tmp_path / "same"))  # same settings: resumes (nothing left to do)
    with pytest.raises(ValueError, match=r"other settings of method.*new hydra.run.dir"):
        train(make_cfg("method.target_weight.tau=0.5", output_dir=tmp_path / "same"))


def test_a_run_waiting_for_the_pretraining_lock_says_who_holds_it(tmp_path, caplog):
    """A second run of the same source pre-training waits for the first one's lock and says so,
    naming the holder; it goes on once the lock is free and then names itself as the holder."""
    import fcntl
    import os
    import threading

    from lightning_stl.pretraining import _lock_saying_who_holds_it

    path = tmp_path / "lock"
    holder = open(path, "a+")  # noqa: SIM115 (held across the thread below)
    fcntl.flock(holder, fcntl.LOCK_EX)
    holder.write("pid 4242 on trainer-7 since 2026-12-01 10:00:00\n")
    holder.flush()
    acquired = threading.Event()

    def second_run():
        with open(path, "a+") as lock:
            _lock_saying_who_holds_it(lock, tmp_path)
            acquired.set()
            lock.seek(0)
            second_run.line = lock.read()

    caplog.set_level("WARNING", logger="lightning_stl")
    thread = threading.Thread(target=second_run)
    thread.start()
    deadline = time.monotonic() + 20
    while "waiting for the source pre-training" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "pid 4242 on trainer-7 since 2026-12-01 10:00:00 holds its lock" in caplog.text
    assert str(tmp_path) in caplog.text and not acquired.is_set()  # still waiting
    fcntl.flock(holder, fcntl.LOCK_UN)
    holder.close()
    thread.join(timeout=20)
    assert acquired.is_set()
    assert second_run.line.startswith(f"pid {os.getpid()} on ")


def test_library_noise_is_dropped_and_everything_else_kept(caplog, monkeypatch):
    import logging
    import warnings

    from lightning_stl.quiet import quiet_library_noise

    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    monkeypatch.setattr(logger, "filters", [])  # earlier runs of this process saw the banner
    quiet_library_noise()
    quiet_library_noise()  # idempotent
    assert len(logger.filters) == 1
    caplog.set_level("INFO", logger="lightning.pytorch.utilities.rank_zero")
    logger.info("💡 Tip: For seamless cloud logging, try installing litlogger")
    logger.info("GPU available: False, used: False")
    logger.info("GPU available: False, used: False")
    logger.info("Restoring states from the checkpoint path at last.ckpt")
    assert [r.getMessage() for r in caplog.records] == [
        "GPU available: False, used: False",
        "Restoring states from the checkpoint path at last.ckpt",
    ]
    with warnings.catch_warnings(record=True) as caught:
        quiet_library_noise()  # catch_warnings reset the filters
        warnings.warn(
            "Found 18 module(s) in eval mode at the start of training. This may", stacklevel=1
        )
        warnings.warn(
            "The number of training batches (1) is smaller than the logging interval", stacklevel=1
        )
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", stacklevel=1)
        warnings.warn("checkpoint directory exists and is not empty", stacklevel=1)
    assert [str(w.message) for w in caught] == ["checkpoint directory exists and is not empty"]


def test_help_shows_the_common_commands_groups_and_experiments(run_cli):
    result = run_cli("--help", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    page = result.stdout
    assert page.startswith("lightning-stl: transfer learning from a source to a target")
    assert "python -m lightning_stl.run -m hparams_search=smooth_tpe" in page
    assert "+experiment=NAME loads a paper setting" in page
    groups = dict(
        line.split(": ", 1)
        for line in page.splitlines()
        if re.match(r"^[a-z_]+: [a-z0-9_, ]+$", line)
    )
    assert "smile_official" in groups["method"] and "svhn_mnist" in groups["experiment"]
    assert {"backbone", "data", "trainer", "hparams_search"} <= set(groups)
    assert "_self_" not in page and "Powered by Hydra" not in page


def test_each_run_draws_its_learning_curves_on_the_runs_step_axis(make_cfg):
    """learning_curve.png: the validation accuracy of every stage's CSV log on the run's step
    axis (fine-tune: the target stage after the source stage), the best step dashed."""
    from lightning_stl.reporting.learning_curve import learning_curve_series

    cfg = make_cfg("method=finetune")
    metrics = train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    source_steps = metrics["stages"][0]["total_steps"]
    series = learning_curve_series(run_dir, [("source", 0), ("target", source_steps)])
    with open(run_dir / "csv" / "target" / "metrics.csv") as handle:
        logged = [
            (source_steps + int(r["step"]) + 1, float(r["val/acc"]))  # Lightning: 0-based
            for r in csv.DictReader(handle)
            if r.get("val/acc")
        ]
    assert series["val/acc"] == logged and logged
    assert dict(series["val/acc"])[metrics["best_step"]] == pytest.approx(metrics["best_val_acc"])
    assert series["val/acc"][-1][0] == metrics["total_steps"]  # the last validation, last step
    rgb = read_rgb(run_dir / "learning_curve.png")
    box = AxesBox.find(rgb)
    last = max(x for points in series.values() for x, _ in points)
    accuracy = box.inside(colour_mask(rgb, "tab:green"))
    assert_curve_through(accuracy, box, logged, (0, last), (0, 1))
    (best_line,) = vertical_lines(colour_mask(rgb, "tab:blue"), box)
    assert abs(best_line - box.column(metrics["best_step"], (0, last))) <= 2


def test_testing_shows_the_progress_bar_that_training_shows(make_cfg, monkeypatch):
    import lightning as L
    from lightning.pytorch.callbacks import TQDMProgressBar

    bars = []
    original = L.Trainer.test

    def test(self, *args, **kwargs):
        bars.append(type(self.progress_bar_callback))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "test", test)
    train(make_cfg("callbacks=default", "trainer.enable_progress_bar=true"))
    assert bars == [TQDMProgressBar]  # Lightning would take its Rich bar (rich is installed)


def test_a_folder_is_not_resumed_at_another_run_fraction_or_precision(tmp_path):
    """run_fraction and the device-resolved fast mode are part of a run's identity; a record
    written before they were still resumes."""
    import json

    from omegaconf import OmegaConf

    from lightning_stl.run_files import check_same_run

    cfg = OmegaConf.create({"seed": 1, "run_fraction": 0.25})
    fast = {"precision": "bf16-mixed", "channels_last": True}
    check_same_run(tmp_path, cfg, fast)
    check_same_run(tmp_path, cfg, fast)  # the same: resumes
    with pytest.raises(ValueError, match="other settings of run_fraction"):
        check_same_run(tmp_path, OmegaConf.create({"seed": 1, "run_fraction": 0.5}), fast)
    with pytest.raises(ValueError, match="other settings of precision, channels_last"):
        check_same_run(tmp_path, cfg, {"precision": "32-true", "channels_last": False})
    record = tmp_path / "run_identity.json"
    old = json.loads(record.read_text())
    for key in ("run_fraction", "precision", "channels_last"):
        del old[key]
    record.write_text(json.dumps(old))
    check_same_run(tmp_path, OmegaConf.create({"seed": 1, "run_fraction": 0.5}), fast)
    with pytest.raises(ValueError, match="other settings of seed"):
        check_same_run(tmp_path, OmegaConf.create({"seed": 2, "run_fraction": 0.5}), fast)
    # the old record, once resumed, was completed: the keys it lacked are checked from now on
    with pytest.raises(ValueError, match="other settings of run_fraction"):
        check_same_run(tmp_path, OmegaConf.create({"seed": 1, "run_fraction": 1.0}), fast)
