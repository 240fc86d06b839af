"""The paper's experiments (`+experiment=svhn_mnist`, `+experiment=cifar10_cifar100`) end to end,
on tiny data sets written here in the real on-disk formats (SVHN .mat, MNIST idx, CIFAR pickles)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from torchvision.datasets import CIFAR10, CIFAR100

from lightning_stl.run import train
from tests.test_torchvision_sets import (
    cifar_rows,
    svhn_arrays,
    trust_cifar_files,
    trust_svhn_files,
    write_idx_images,
    write_idx_labels,
    write_pickle,
)

TINY_PAPER = [
    "data.val_size=20",
    "data.target_size=20",
    "data.target_batch_size=8",
    "data.source_batch_size=8",
    "data.eval_batch_size=16",
    "epochs.joint=1",
    "epochs.source=1",
    "epochs.target=2",
    "trainer.enable_progress_bar=false",
    "callbacks=none",
]


def write_svhn_and_mnist(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for split, n in (("train", 60), ("test", 30)):
        x, y = svhn_arrays(n, n)
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})
    trust_svhn_files(monkeypatch, root)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 10)):
        write_idx_images(
            raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        )
        write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)


def write_cifar(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c10 = root / "cifar-10-batches-py"
    c10.mkdir(parents=True)
    for b in range(1, 6):
        write_pickle(
            c10 / f"data_batch_{b}", {"data": cifar_rows(12, b), "labels": list(range(10)) + [0, 1]}
        )
    write_pickle(c10 / "test_batch", {"data": cifar_rows(10, 9), "labels": list(range(10))})
    write_pickle(c10 / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    c100 = root / "cifar-100-python"
    c100.mkdir(parents=True)
    write_pickle(
        c100 / "train",
        {"data": cifar_rows(100, 1), "fine_labels": list(range(100)), "coarse_labels": [0] * 100},
    )
    write_pickle(
        c100 / "test",
        {"data": cifar_rows(10, 2), "fine_labels": list(range(10)), "coarse_labels": [0] * 10},
    )
    write_pickle(c100 / "meta", {"fine_label_names": [f"f{i}" for i in range(100)]})
    trust_cifar_files(monkeypatch, CIFAR10, root)
    trust_cifar_files(monkeypatch, CIFAR100, root)


@pytest.mark.parametrize("method", ["smooth", "finetune"])
def test_svhn_mnist_experiment_runs_on_real_formats(make_cfg, tmp_path, monkeypatch, method):
    root = tmp_path / "paper_data"
    root.mkdir()
    write_svhn_and_mnist(root, monkeypatch)
    cfg = make_cfg("+experiment=svhn_mnist", f"method={method}", *TINY_PAPER, tiny=False)
    cfg.data.root = str(root)
    metrics = train(cfg)
    assert (metrics["target"], metrics["source"]) == ("svhn", "mnist")
    assert (metrics["target_size"], metrics["val_size"], metrics["source_size"]) == (20, 20, 40)
    state = torch.load(
        Path(cfg.paths.output_dir) / "checkpoints" / "target" / "last.ckpt"
        if method == "finetune"
        else Path(cfg.paths.output_dir) / "checkpoints" / "joint" / "last.ckpt",
        map_location="cpu",
        weights_only=True,
    )
    assert state["hyper_parameters"]["backbone"] == "wrn10_2"
    assert state["hyper_parameters"]["backbone_options"]["drop_rate"] == 0.4
    assert any(k.endswith("source_running_mean") for k in state["state_dict"])  # per-domain BN
    assert (
        json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())["test_acc"]
        == metrics["test_acc"]
    )


def test_cifar_experiment_runs_on_real_formats(make_cfg, tmp_path, monkeypatch):
    root = tmp_path / "paper_data"
    root.mkdir()
    write_cifar(root, monkeypatch)
    cfg = make_cfg("+experiment=cifar10_cifar100", *TINY_PAPER, tiny=False)
    cfg.data.root = str(root)
    metrics = train(cfg)
    assert (metrics["target"], metrics["source"], metrics["source_size"]) == (
        "cifar10",
        "cifar100",
        100,
    )
    state = torch.load(
        Path(cfg.paths.output_dir) / "checkpoints" / "joint" / "last.ckpt",
        map_location="cpu",
        weights_only=True,
    )
    assert state["state_dict"]["model.source_head.weight"].shape[0] == 100
    assert state["state_dict"]["model.target_head.weight"].shape[0] == 10
    assert not any(k.endswith("source_running_mean") for k in state["state_dict"])  # shared BN
