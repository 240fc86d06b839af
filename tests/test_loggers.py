"""The CSV log of a run killed and resumed holds every step once (Lightning's deletes it)."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_stl.loggers import ResumableCSVLogger
from lightning_stl.methods.evaluation import TargetEvaluation


class Linear(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("train/loss", loss)
        self.log("train/step_seen", float(self.global_step))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(tmp_path: Path, logger_class, max_steps: int, ckpt_path: str | None = None) -> None:
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(64, 3)), batch_size=4)
    trainer = L.Trainer(
        max_steps=max_steps,
        logger=logger_class(save_dir=str(tmp_path), name="csv", version="joint"),
        log_every_n_steps=1,
        callbacks=[
            ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
        ],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Linear(), data, ckpt_path=ckpt_path)


def logged_steps(tmp_path: Path) -> list[int]:
    with open(tmp_path / "csv" / "joint" / "metrics.csv", newline="") as handle:
        return [int(r["step"]) for r in csv.DictReader(handle) if r.get("train/loss")]


@pytest.mark.parametrize(("logger_class", "kept"), [(ResumableCSVLogger, True), (CSVLogger, False)])
def test_a_resumed_fit_keeps_the_rows_before_its_checkpoint_once(tmp_path, logger_class, kept):
    fit(tmp_path, logger_class, max_steps=6)  # "killed" after 6 steps, checkpoint at step 4
    assert logged_steps(tmp_path) == list(range(6))
    (checkpoint,) = (tmp_path / "ckpt").glob("*step=4.ckpt")
    fit(tmp_path, logger_class, max_steps=10, ckpt_path=str(checkpoint))
    if kept:  # steps 0-3 from the first fit, 4-9 from the resumed one: each once
        assert logged_steps(tmp_path) == list(range(10))
        with open(tmp_path / "csv" / "joint" / "metrics.csv", newline="") as handle:
            seen = [float(r["train/step_seen"]) for r in csv.DictReader(handle)]
        assert seen == [float(s) for s in range(10)]
        assert not list((tmp_path / "csv" / "joint").glob("*.tmp"))
    else:  # Lightning's logger: the first part of the log is gone
        assert logged_steps(tmp_path) == list(range(4, 10))


class GatedLinear(TargetEvaluation):
    """A LightningModule that logs its loss through ``TargetEvaluation.log_training_loss``."""

    def __init__(self):
        super().__init__(num_target_classes=2)
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log_training_loss(loss, {"part": 2 * loss})
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def logged_rows(folder: Path, every: int, accumulate: int) -> list[dict[str, str]]:
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(64, 3)), batch_size=4)
    trainer = L.Trainer(
        max_steps=7,
        logger=CSVLogger(save_dir=str(folder), name="csv", version="v"),
        log_every_n_steps=every,
        accumulate_grad_batches=accumulate,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(GatedLinear(), data)
    with open(folder / "csv" / "v" / "metrics.csv", newline="") as handle:
        return [r for r in csv.DictReader(handle) if r.get("train/loss")]


@pytest.mark.parametrize(("every", "accumulate"), [(3, 1), (2, 2), (1, 1)])
def test_logging_only_the_written_steps_writes_what_logging_every_step_writes(
    tmp_path, monkeypatch, every, accumulate
):
    gated = logged_rows(tmp_path / "gated", every, accumulate)
    monkeypatch.setattr("lightning_stl.methods.evaluation.logs_this_step", lambda trainer: True)
    every_step = logged_rows(tmp_path / "every", every, accumulate)
    assert gated == every_step
    assert [int(r["step"]) for r in gated] == [s for s in range(7) if (s + 1) % every == 0]
