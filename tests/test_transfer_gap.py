"""The embedded pair is a real transfer problem: pre-training on the rendered digits helps when
real digits are few, and stops mattering when they are many (mean of 3 seeds).

Slow (about 10 minutes on 2 CPU cores): ``pytest -m slow tests/test_transfer_gap.py``. The full
table is made by ``python experiments/transfer_gap.py``.
"""

from __future__ import annotations

import statistics

import pytest

from lightning_stl.run import train

pytestmark = pytest.mark.slow


def mean_test_accuracy(make_cfg, tmp_path, method: str, size: int) -> float:
    accs = []
    for seed in (0, 1, 2):
        cfg = make_cfg(
            f"method={method}",
            f"data.target_size={size}",
            f"seed={seed}",
            "epochs.source=10",
            "trainer.enable_progress_bar=false",
            "callbacks=none",
            tiny=False,
            output_dir=tmp_path / f"{method}_{size}_{seed}",
        )
        accs.append(100 * train(cfg)["test_acc"])
    return statistics.mean(accs)


def test_finetuning_beats_target_only_when_target_data_are_few(make_cfg, tmp_path):
    target_only = mean_test_accuracy(make_cfg, tmp_path, "target_only", 10)
    finetune = mean_test_accuracy(make_cfg, tmp_path, "finetune", 10)
    assert finetune >= target_only + 5, (target_only, finetune)


def test_the_gap_closes_with_the_whole_training_pool(make_cfg, tmp_path):
    target_only = mean_test_accuracy(make_cfg, tmp_path, "target_only", 997)
    finetune = mean_test_accuracy(make_cfg, tmp_path, "finetune", 997)
    assert target_only >= 97 and abs(finetune - target_only) <= 1.5, (target_only, finetune)
