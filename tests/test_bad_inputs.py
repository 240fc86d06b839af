"""Every bad input gets one message that names the value and what is allowed, before training.

The table below is the list: an input (overrides of ``python -m lightning_stl.run``, some with a
file the test makes first) → the words its message must contain. Each case composes the config
as the command line would, calls :func:`lightning_stl.run.train`, and checks that the error is
an input error (:func:`lightning_stl.errors.user_message` gives its one line; the entry point
prints that line as ``error: ...`` and exits with 2, without a traceback) and that no training
started. New options join the table.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch

from lightning_stl.errors import user_message
from lightning_stl.run import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _weights_of_another_backbone(tmp: Path) -> None:
    from lightning_stl.models.registry import create_backbone

    torch.save(create_backbone("resnet20", in_chans=1).state_dict(), tmp / "resnet20.pth")


def _garbage_files(tmp: Path) -> None:
    (tmp / "garbage.pth").write_bytes(b"\x00not a checkpoint" * 64)
    (tmp / "notes.txt").write_text("these are not weights\n")
    (tmp / "a_file").write_text("a file where a folder belongs\n")


def _damaged_mnist(tmp: Path) -> None:
    raw = tmp / "mnistroot" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (raw / name).write_bytes(b"\x01\x02garbage" * 10)


SMILE = ["+experiment=digits_smile", "pretraining.on_source=false"]
FULL = "<not tiny>"  # compose without tests/conftest.py's TINY overrides

# (id, overrides, words the message must contain (regular expressions, in order)).
# "{tmp}" is a folder the case's files are made in.
CASES = [
    # optimiser
    ("lr<0", ["optimizer.lr=-1"], [r"optimizer\.lr=-1", r"> 0"]),
    ("lr-text", ["optimizer.lr=abc"], [r"optimizer\.lr='?abc", r"number"]),
    ("weight_decay", ["optimizer.weight_decay=-1"], [r"optimizer\.weight_decay=-1", ">= 0"]),
    ("momentum", ["optimizer.momentum=1.5"], [r"optimizer\.momentum=1\.5", r"\[0, 1\)"]),
    ("warmup", ["optimizer.warmup_fraction=2"], [r"warmup_fraction=2", r"\[0, 1\)"]),
    ("final_lr", ["optimizer.final_lr=-1"], [r"optimizer\.final_lr=-1", r"\[0, lr"]),
    (
        "schedule",
        ["optimizer=sgd_step", "optimizer.schedule=linear"],
        [r"optimizer\.schedule='linear'", "step"],
    ),
    # run length and settings of the run
    ("epochs.joint=0", ["epochs.joint=0"], [r"epochs\.joint=0", r"integer >= 1"]),
    ("epochs.source<0", ["method=finetune", "epochs.source=-3"], [r"epochs\.source=-3", ">= 1"]),
    ("epochs.target", ["method=target_only", "epochs.target=abc"], [r"epochs\.target='abc'"]),
    ("steps.finetune=0", [*SMILE, "steps.finetune=0"], [r"steps\.finetune=0", ">= 1"]),
    (
        "with_source_head",
        [*SMILE, "method=finetune_l2", "+method.module.with_source_head=maybe"],
        [r"with_source_head='maybe' is not allowed", "true or false"],
    ),
    ("seed<0", ["seed=-1"], [r"seed=-1", r"integer in \[0, 4294967295\]"]),
    ("seed-text", ["seed=abc"], [r"seed='abc'", "integer"]),
    ("threads-text", ["torch_threads=abc"], [r"torch_threads='abc'", ">= 1"]),
    ("threads<0", ["torch_threads=-1"], [r"torch_threads=-1", ">= 1"]),
    ("threads=0", ["torch_threads=0"], [r"torch_threads=0", ">= 1"]),
    ("val_every=0", ["val_every_n_steps=0"], [r"val_every_n_steps=0", ">= 1, or null"]),
    ("val_every<0", ["val_every_n_steps=-10"], [r"val_every_n_steps=-10", ">= 1"]),
    ("run_fraction=0", ["run_fraction=0"], [r"run_fraction=0", r"in \(0, 1\]"]),
    ("run_fraction>1", ["run_fraction=1.5"], [r"run_fraction=1.5", r"in \(0, 1\]"]),
    ("run_fraction-text", ["run_fraction=half"], [r"run_fraction='half'", "finite number"]),
    (
        "run_fraction-accumulate",
        ["run_fraction=0.5", "+trainer.accumulate_grad_batches=3"],
        [r"accumulate_grad_batches=3", "not a multiple of 3", "divides the epoch"],
    ),
    (
        "run_fraction-val_check_interval",
        ["run_fraction=0.5", "+trainer.val_check_interval=5"],
        [r"val_check_interval=5", "Leave trainer.val_check_interval unset"],
    ),
    ("fast_mode-text", ["speed.fast_mode=yes"], [r"speed.fast_mode='yes'", "auto, true or false"]),
    ("compile-number", ["speed.compile=1"], [r"speed.compile=1", "true or false"]),
    ("failure_value", ["failure_value=abc"], [r"failure_value=abc", "number"]),
    ("batchnorm", ["batchnorm=nonsense"], [r"batchnorm='nonsense'", "shared"]),
    ("trainer.max_epochs", ["+trainer.max_epochs=1"], [r"trainer\.max_epochs", r"epochs\.joint"]),
    ("trainer.max_steps", ["+trainer.max_steps=5"], [r"trainer\.max_steps", r"steps\.finetune"]),
    (
        "resume-steps",
        ["callbacks.resume_checkpoint.every_n_train_steps=0"],
        [r"every_n_train_steps=0", ">= 1"],
    ),
    (
        "resume-minutes",
        ["callbacks.resume_checkpoint.every_n_minutes=-1"],
        [r"every_n_minutes=-1", "> 0"],
    ),
    # the method and its schedule
    ("misspelt key", ["+method.target_weigth.tau=1"], [r"method\.target_weigth", "target_weight"]),
    ("schedule key", ["+method.target_weight.tua=1"], [r"method\.target_weight\.tua", "tau"]),
    ("relative", ["method.target_weight.relative=maybe"], [r"relative='?maybe", "true or false"]),
    ("tau=0", ["method.target_weight.tau=0"], [r"tau=0\.0 is not allowed", "> 0"]),
    ("t0 huge", ["method.target_weight.t0=1e9"], [r"target_weight", r"never", r"t0"]),
    ("alpha huge", ["method.target_weight.alpha=1e6"], [r"target_weight", r"never", "alpha"]),
    ("regularizer group", ["+regularizer=l2sp"], [r"regularizer", r"method\.regularizers"]),
    ("unknown regulariser", [*SMILE, "method.regularizers=[l2sq]"], ["l2sq", "l2sp"]),
    # data
    ("target_size=0", ["data.target_size=0"], [r"target_size=0", ">= 1"]),
    ("target_size big", ["data.target_size=5000"], [r"target_size=5000", r"allowed: 1 to"]),
    ("val_size big", ["data.val_size=2000"], [r"data\.val_size=2000", r"1,297", r"0 to 1,296"]),
    ("val_size<0", ["data.val_size=-1"], [r"val_size=-1", ">= 0"]),
    ("num_images=0", ["data.source_options.num_images=0"], [r"num_images=0", ">= 1"]),
    ("source=mnist", ["data.source=mnist"], [r"num_images", "mnist", "data.source_options"]),
    ("target unknown", ["data.target=digitz"], ["digitz", "digits"]),
    ("augment", ["data.target_augment=nonsense"], [r"data\.target_augment='?nonsense", "crop"]),
    ("augment key", ["+data.target_augment.flip=true"], [r"flip", "horizontal_flip"]),
    ("augment value", ["+data.target_augment.crop_padding=abc"], ["crop_padding='abc'", ">= 0"]),
    ("batch=0", ["data.target_batch_size=0"], [r"target_batch_size=0", "> 0"]),
    ("workers<0", ["data.num_workers=-2"], [r"num_workers=-2", ">= 0"]),
    ("no paper data", [FULL, "+experiment=svhn_mnist", "data.root={tmp}/empty"], ["not found"]),
    (
        "damaged mnist",
        [
            FULL,
            "data=svhn_mnist",
            "data.target=mnist",
            "data.source=null",
            "method=target_only",
            "data.root={tmp}/mnistroot",
        ],
        ["mnist", r"damaged|cannot be read", "train-images-idx3-ubyte"],
    ),
    ("data root is a file", ["data.root={tmp}/a_file"], [r"a_file", "not a folder"]),
    # backbone and weights
    ("backbone name", ["backbone.name=resnet2O"], ["resnet2O", "resnet20"]),
    (
        "timm name",
        ["backbone=timm", "backbone.name=nosuchnet_42", "backbone.in_chans=1"],
        ["nosuchnet_42", "timm"],
    ),
    ("in_chans", ["backbone.in_chans=3"], [r"backbone\.in_chans=3", r"1 channel"]),
    ("weights missing", [*SMILE, "backbone.weights={tmp}/none.pth"], ["none.pth", "not exist"]),
    (
        "weights of another net",
        [*SMILE, "backbone.weights={tmp}/resnet20.pth"],
        ["resnet20.pth", "does not fit"],
    ),
    (
        "weights corrupt",
        [*SMILE, "backbone.weights={tmp}/garbage.pth"],
        ["garbage.pth", "cannot be read"],
    ),
    ("weights text", [*SMILE, "backbone.weights={tmp}/notes.txt"], ["notes.txt", "cannot be read"]),
    ("no source model", [*SMILE], [r"pre-trained model", r"backbone\.weights"]),
    # where the run writes
    ("run dir in /proc", ["paths.output_dir=/proc/lightning_stl_run"], ["/proc", "folder"]),
    ("cv_folds", [*SMILE, "+data.cv_folds=1"], [r"cv_folds=1", ">= 2"]),
    ("cv_fold", [*SMILE, "+data.cv_folds=3", "+data.cv_fold=5", "data.val_size=0"], [r"cv_fold=5"]),
    ("protocol", ["+data.protocol=C:200%/N:4", "data.target_size=null"], ["C:200%"]),
]


@pytest.fixture
def files(tmp_path: Path) -> Path:
    folder = tmp_path / "files"
    folder.mkdir()
    _weights_of_another_backbone(folder)
    _garbage_files(folder)
    _damaged_mnist(folder)
    return folder


@pytest.mark.parametrize(("overrides", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_input_stops_before_training_with_one_message(
    make_cfg, files, overrides, words, monkeypatch
):
    def no_training() -> None:
        raise AssertionError("a training batch began before the input was refused")

    monkeypatch.setattr("lightning_stl.errors.mark_training_started", no_training)
    overrides = [o.replace("{tmp}", str(files)) for o in overrides]
    output = None
    for o in overrides:
        if o.startswith("paths.output_dir="):
            output = Path(o.split("=", 1)[1])
    composed = [o for o in overrides if not o.startswith("paths.output_dir=")]
    tiny = FULL not in composed
    composed = [o for o in composed if o != FULL]
    cfg = make_cfg(*composed, tiny=tiny, output_dir=output)
    with pytest.raises(Exception) as info:
        train(cfg)
    message = user_message(info.value)
    assert message is not None, f"not an input error: {info.value!r}"
    assert "\n" not in message and len(message) < 1000, message
    position = 0
    for word in words:
        found = re.compile(word).search(message, position)
        assert found, f"{word!r} not in (the rest of) {message!r}"
        position = found.end()
    run_dir = Path(cfg.paths.output_dir)
    assert not list(run_dir.rglob("*.ckpt")), "a checkpoint was written before the message"


def test_the_table_counts_every_case():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))


def test_the_project_errors_survive_a_process_pool():
    from lightning_stl.checkpoint_io import DamagedCheckpointError
    from lightning_stl.data import DatasetNotFoundError
    from lightning_stl.models.registry import PretrainedFileError

    errors = [
        DatasetNotFoundError("svhn", "/data", ["train_32x32.mat"], reason="offline", hint=None),
        PretrainedFileError(Path("w.pth"), "digits_cnn", ["a"], ["b"], {"c": ((1,), (2,))}),
        DamagedCheckpointError("checkpoint x cannot be read"),
    ]
    for error in errors:
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error)


def test_the_command_line_prints_the_message_alone_and_exits_with_2(run_cli, tmp_path):
    result = run_cli("optimizer.lr=-1", f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.strip().splitlines()[-1].startswith("error: optimizer.lr=-1")


@pytest.mark.parametrize(
    ("script", "experiment", "profile"),
    [("reproduce_table1.py", "svhn_mnist", "quick"), ("reproduce_smile.py", "cub200", "paper")],
)
def test_a_driver_without_its_data_says_so_through_its_process_pool(
    script, experiment, profile, tmp_path, subprocess_env
):
    # the worker's "data not found" comes back through the pool (it pickles), as one line
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    empty = tmp_path / "empty"
    empty.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            str(root / "experiments" / script),
            f"--experiment={experiment}",
            f"--profile={profile}",
            f"--data={empty}",
            f"--work={tmp_path / 'work'}",
            f"--out={tmp_path / 'out'}",
            "--jobs=2",
        ],
        cwd=root,
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "BrokenProcessPool" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data set") and "was not found in" in last and str(empty) in last


def test_jobs_must_be_a_positive_integer(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, str(root / "experiments" / "reproduce_table1.py"), "--jobs=0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "--jobs: '0' is not allowed: it must be an integer >= 1" in result.stderr
