"""Checkpoints are whole or absent: a failed save keeps the previous file and says why, and a
damaged file found on resume is named with what to do."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

import lightning_stl.checkpoint_io as checkpoint_io
import lightning_stl.run as run_module
import lightning_stl.stages as stages_module
from lightning_stl.checkpoint_io import (
    AtomicCheckpointIO,
    DamagedCheckpointError,
    read_checkpoint,
    write_atomically,
)
from lightning_stl.run import train


def test_a_save_replaces_the_file_through_a_temporary_in_the_same_folder(tmp_path, monkeypatch):
    path = tmp_path / "ckpt" / "last.ckpt"
    renames: list[tuple[Path, Path]] = []
    original = os.replace

    def spy(source, target):
        renames.append((Path(source), Path(target)))
        assert Path(source).stat().st_size > 0  # written and flushed before the rename
        return original(source, target)

    monkeypatch.setattr(checkpoint_io.os, "replace", spy)
    AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.arange(3)}, path)
    AtomicCheckpointIO().save_checkpoint({"step": 2, "w": torch.arange(4)}, path)
    assert torch.load(path, weights_only=True)["step"] == 2
    assert [target for _, target in renames] == [path, path]
    assert all(source.parent == path.parent and source != path for source, _ in renames)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint_and_raises(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    write_atomically({"step": 7}, path)
    before = path.read_bytes()

    def fill_the_disk(obj, handle):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_io.torch, "save", fill_the_disk)
    with pytest.raises(OSError, match="No space left on device"):
        AtomicCheckpointIO().save_checkpoint({"step": 8}, path)
    assert path.read_bytes() == before  # the previous checkpoint, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no partial file left


def test_an_unwritable_folder_is_an_error_not_a_silently_dropped_save(tmp_path, monkeypatch):
    """Lightning's own ``_atomic_save`` swallows a PermissionError; this plugin raises it."""
    real_open = open

    def refuse(file, mode="r", *args, **kwargs):
        if "w" in mode and Path(file).parent == tmp_path:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refuse)
    with pytest.raises(PermissionError, match="Permission denied"):
        AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "last.ckpt")
    assert not any(tmp_path.iterdir())


def test_storage_options_are_refused():
    with pytest.raises(TypeError, match="no storage_options"):
        AtomicCheckpointIO().save_checkpoint({}, "x.ckpt", storage_options={"a": 1})


class CheckpointIOSeen(Callback):
    def on_fit_start(self, trainer, pl_module):
        self.io = trainer.strategy.checkpoint_io


def test_every_run_saves_its_checkpoints_atomically(make_cfg, monkeypatch):
    seen = CheckpointIOSeen()
    original = stages_module.stage_callbacks
    monkeypatch.setattr(stages_module, "stage_callbacks", lambda *args: [*original(*args), seen])
    saved: list[Path] = []
    real = checkpoint_io.write_atomically
    monkeypatch.setattr(
        checkpoint_io, "write_atomically", lambda obj, path: (saved.append(path), real(obj, path))
    )
    cfg = make_cfg()
    metrics = train(cfg)
    assert isinstance(seen.io, AtomicCheckpointIO)
    folder = Path(cfg.paths.output_dir) / "checkpoints" / "joint"
    assert folder / "last.ckpt" in saved
    assert Path(metrics["stages"][-1]["best_model_path"]) in saved
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_a_damaged_checkpoint_is_named_with_what_to_do(tmp_path):
    path = tmp_path / "last.ckpt"
    write_atomically({"step": 3}, path)
    path.write_bytes(path.read_bytes()[:40])  # truncated
    with pytest.raises(DamagedCheckpointError) as caught:
        read_checkpoint(path, "resume the unfinished stage 'joint'")
    message = str(caught.value)
    assert str(path) in message and "truncated or corrupt" in message
    assert "resume the unfinished stage 'joint'" in message and "Delete it" in message
    # it survives a process pool (pickled back from a worker) with its message
    assert str(pickle.loads(pickle.dumps(caught.value))) == message
    text = tmp_path / "weights.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(DamagedCheckpointError, match=r"weights.txt cannot be read"):
        read_checkpoint(text, "test")
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "absent.ckpt", "test")


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_resuming_from_a_truncated_checkpoint_stops_with_its_name(make_cfg):
    cfg = make_cfg("method=finetune")
    train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    stage_file = run_dir / "checkpoints" / "source" / "stage.json"
    last = run_dir / json.loads(stage_file.read_text())["last_model_path"]
    truncate(last)
    train(cfg)  # a finished run reports from its best checkpoint: the source's is not read
    shutil.rmtree(run_dir / "checkpoints" / "target")
    # the target stage starts from the finished source stage, whose checkpoint is damaged
    with pytest.raises(DamagedCheckpointError, match=r"load the finished stage 'source'"):
        train(cfg)
    stage_file.unlink()  # an unfinished stage resumes from last.ckpt
    with pytest.raises(DamagedCheckpointError, match=r"resume the unfinished stage 'source'"):
        train(cfg)


def test_an_unwritable_run_folder_stops_before_training(make_cfg, tmp_path, monkeypatch):
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "checkpoints").write_text("a file where the checkpoint folder must go")
    cfg = make_cfg(output_dir=blocked)
    fits: list[int] = []
    monkeypatch.setattr(run_module, "run_stage", lambda *a, **k: fits.append(1))
    with pytest.raises(
        ValueError, match=r"checkpoint folder .*blocked/checkpoints cannot be written"
    ):
        train(cfg)
    # a folder the user may not write (root writes everywhere, so the refusal is simulated)
    real_open = open

    def refuse(file, mode="r", *args, **kwargs):
        if "w" in mode and Path(file).name.startswith(".write-test-"):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refuse)
    with pytest.raises(
        ValueError, match=r"run folder .*run cannot be written \(Permission denied\); nothing"
    ):
        train(make_cfg())
    assert not fits  # nothing was trained


def test_an_unwritable_pretraining_cache_stops_before_training(make_cfg, tmp_path):
    (tmp_path / "cache").write_text("a file")
    cfg = make_cfg(
        "+experiment=digits_smile",
        "pretraining.epochs=1",
        "steps.finetune=2",
        f"pretraining.cache_dir={tmp_path / 'cache'}",
    )
    with pytest.raises(ValueError, match=r"pre-training cache folder .*cache/.* cannot be written"):
        train(cfg)


def test_a_copied_run_folder_reads_its_own_checkpoints(make_cfg, tmp_path):
    """stage.json stores paths relative to the run folder: a copy of a finished run, run again,
    reports from its own files even when the original's are gone."""
    original = make_cfg(output_dir=tmp_path / "original")
    first = train(original)
    stage_file = tmp_path / "original" / "checkpoints" / "joint" / "stage.json"
    recorded = json.loads(stage_file.read_text())
    assert recorded["last_model_path"] == "checkpoints/joint/last.ckpt"
    assert recorded["best_model_path"].startswith("checkpoints/joint/best-step")
    shutil.copytree(tmp_path / "original", tmp_path / "copy")
    shutil.rmtree(tmp_path / "original" / "checkpoints")
    again = train(make_cfg(output_dir=tmp_path / "copy"))
    assert again["test_acc"] == first["test_acc"] and again["best_step"] == first["best_step"]
    assert again["stages"][-1]["best_model_path"].startswith(str(tmp_path / "copy"))


def test_a_folder_of_absolute_paths_prefers_its_own_files(make_cfg, tmp_path):
    """stage.json files written before paths were relative name the original's files."""
    cfg = make_cfg(output_dir=tmp_path / "old")
    first = train(cfg)
    stage_file = tmp_path / "old" / "checkpoints" / "joint" / "stage.json"
    recorded = json.loads(stage_file.read_text())
    for key in ("last_model_path", "best_model_path"):  # as an older version wrote it
        recorded[key] = str(tmp_path / "elsewhere" / recorded[key])
    stage_file.write_text(json.dumps(recorded))
    again = train(cfg)
    assert again["test_acc"] == first["test_acc"]
