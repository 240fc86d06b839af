"""Feature-IL and Label-IL of modules and of finished runs (SMILE Eq. 6, Table 6).

:func:`interpolation_losses` is zero for a linear model and not for a non-linear one and agrees
with a direct computation on the same pairs; the command (``python -m
lightning_stl.interpolation``) prints a deterministic table for a real tiny run and names what a
bad folder lacks."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_stl.finished_run import read_run
from lightning_stl.interpolation import draw_pairs, feature_functions, interpolation_losses, main
from lightning_stl.methods import FineTune, SmoothTransfer
from lightning_stl.metrics import InterpolationLoss, interpolation_inputs
from lightning_stl.run import compose_config, train


def digit_images(n: int = 150) -> DataLoader:
    """Random 1 x 8 x 8 'digits' in batches of 64 (the last batch of pairs is partial)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(n, 1, 8, 8, generator=generator)
    return DataLoader(TensorDataset(images, torch.zeros(n, dtype=torch.long)), batch_size=64)


def linear_finetune() -> FineTune:
    """A FineTune whose backbone is linear: features and logits are affine in the pixels."""
    torch.manual_seed(0)
    module = FineTune(backbone="digits_cnn", in_chans=1, num_target_classes=10)
    module.backbone = nn.Sequential(nn.Flatten(), nn.Linear(64, module.head.in_features))
    return module


def test_a_linear_model_has_zero_label_and_feature_il():
    losses = interpolation_losses(linear_finetune(), digit_images(), num_pairs=300, seed=1)
    assert set(losses) == {"feature_il", "label_il"}
    assert losses["feature_il"] < 1e-5 and losses["label_il"] < 1e-5


def test_a_non_linear_model_does_not_and_its_mode_is_kept():
    torch.manual_seed(0)
    module = FineTune(backbone="digits_cnn", in_chans=1, num_target_classes=10).train()
    losses = interpolation_losses(module, digit_images(), num_pairs=300, seed=1)
    assert losses["feature_il"] > 1e-3 and losses["label_il"] > 1e-3
    assert module.training  # evaluated in eval mode, handed back in train mode


def test_pairs_read_in_chunks_give_the_direct_computation():
    torch.manual_seed(0)
    module = FineTune(backbone="digits_cnn", in_chans=1, num_target_classes=10).eval()
    loader = digit_images()
    images = loader.dataset.tensors[0]
    first, second, d1, d2, lam = draw_pairs(len(images), 300, 1.0, torch.Generator().manual_seed(1))
    assert not torch.any(first == second)
    inputs = interpolation_inputs(images[first], images[second], d1, d2, lam)
    with torch.no_grad():
        features = [module.extract_features(x) for x in inputs]
    direct = InterpolationLoss()
    direct.update(*features, lam)
    losses = interpolation_losses(module, loader, num_pairs=300, seed=1)
    assert losses["feature_il"] == pytest.approx(float(direct.compute()), rel=1e-5)


def test_feature_functions_of_each_method_and_a_clear_error_otherwise():
    smooth = SmoothTransfer(backbone="digits_cnn", in_chans=1)
    assert feature_functions(smooth) == (smooth.model.backbone, smooth.model.target_head)
    with pytest.raises(TypeError, match="extract_features"):
        feature_functions(nn.Linear(3, 3))


@pytest.fixture(scope="module")
def smile_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[Path, Path]:
    """A tiny SMILE run (mean teacher, auxiliary head) and its data folder."""
    tmp = tmp_path_factory.mktemp("interpolation")
    cfg = compose_config(
        [
            "+experiment=digits_smile",
            "pretraining.epochs=1",
            "steps.finetune=10",
            "data.target_size=30",
            "data.source_options.num_images=400",
            "trainer.enable_progress_bar=false",
            "callbacks=none",
            f"pretraining.cache_dir={tmp / 'pre'}",
        ],
        output_dir=tmp / "run",
        data_dir=data_dir,
    )
    train(cfg)
    return tmp / "run", data_dir


def table_numbers(output: str) -> list[list[float]]:
    rows = [line for line in output.splitlines() if line.startswith("| smile")]
    return [[float(cell) for cell in row.strip("|").split("|")[1:]] for row in rows]


def test_command_prints_a_deterministic_table_for_a_run(smile_run, tmp_path, capsys):
    run_dir, data_dir = smile_run
    args = [str(run_dir), "--pairs", "200", "--data-dir", str(data_dir)]
    main([*args, "--output", str(tmp_path / "t.md"), "--csv", str(tmp_path / "t.csv")])
    first = capsys.readouterr().out
    main(args)
    second = capsys.readouterr().out
    assert first == second
    (numbers,) = table_numbers(first)
    assert len(numbers) == 4 and all(math.isfinite(v) and v > 0 for v in numbers)
    assert "| Run | Label-IL Train | Label-IL Test | Feature-IL Train | Feature-IL Test |" in first
    assert (tmp_path / "t.md").read_text() in first
    assert "test_acc" in (tmp_path / "t.csv").read_text().splitlines()[0]


def test_bad_folders_are_refused_with_what_they_lack(smile_run, tmp_path):
    with pytest.raises(SystemExit) as refused:
        main([str(tmp_path)])
    message = str(refused.value.code)
    assert "not a finished run folder" in message
    assert "run_identity.json" in message and "metrics.json" in message

    run_dir, _ = smile_run
    copy = tmp_path / "no_checkpoints"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("checkpoints"))
    metrics = json.loads((copy / "metrics.json").read_text())
    for stage in metrics["stages"]:  # as if the folder had been moved and its checkpoints lost
        stage["best_model_path"] = stage["last_model_path"] = str(tmp_path / "gone.ckpt")
    (copy / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(FileNotFoundError, match="has no best checkpoint"):
        read_run(copy)
    with pytest.raises(SystemExit, match="has no last checkpoint"):
        main([str(copy), "--checkpoint", "last"])
