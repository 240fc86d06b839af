"""`method.regularizers`: regularisers by name, composable with each other and with mixup."""

from __future__ import annotations

import csv
from pathlib import Path

import hydra
import pytest

from lightning_stl.method_module import resolve_regularizers
from lightning_stl.methods import FineTune
from lightning_stl.run import compose_config, train

METHODS = {
    "l2sp": ["lightning_stl.regularizers.l2sp.L2SP"],
    "bss": ["lightning_stl.regularizers.bss.BatchSpectralShrinkage"],
    "delta": ["lightning_stl.regularizers.delta.DELTA"],
    "cotuning": ["lightning_stl.regularizers.cotuning.CoTuning"],
    "regsl": ["lightning_stl.regularizers.regsl.RegSL"],
    "rifle": [],
    "delta_mixup": ["lightning_stl.regularizers.delta.DELTA"],
    "bss_mixup": ["lightning_stl.regularizers.bss.BatchSpectralShrinkage"],
    "rifle_mixup": [],
}


@pytest.mark.parametrize(("method", "targets"), METHODS.items())
def test_every_baseline_resolves_its_regularizers(method, targets, tmp_path):
    cfg = compose_config(["+experiment=digits_smile", f"method={method}"], tmp_path, tmp_path)
    alpha, configs = resolve_regularizers(cfg.method.regularizers, cfg)
    assert [c["_target_"] for c in configs] == targets
    assert (alpha is not None) == method.endswith("_mixup")
    for conf in configs:  # ${paths.*} in a regulariser file is resolved
        assert all("${" not in str(v) for v in conf.values())


def test_regularizers_compose_with_mixup_and_options(tmp_path):
    cfg = compose_config(
        [
            "+experiment=digits_smile",
            "method=finetune_l2",
            "method.regularizers=[bss,l2sp,mixup]",
            "+method.regularizer_options.bss.eta=0.5",
            "+method.regularizer_options.mixup.alpha=0.4",
        ],
        tmp_path,
        tmp_path,
    )
    alpha, configs = resolve_regularizers(cfg.method.regularizers, cfg)
    assert alpha == 0.4
    assert [c["_target_"].rsplit(".", 1)[1] for c in configs] == ["BatchSpectralShrinkage", "L2SP"]
    assert configs[0]["eta"] == 0.5 and configs[0]["k"] == 1
    regularizers = [hydra.utils.instantiate(conf) for conf in configs]
    module = FineTune(num_target_classes=10, mixup_alpha=alpha, regularizers=regularizers)
    assert [r.name for r in module.regularizers] == ["bss", "l2sp"]


def test_unknown_regularizer_names_the_known_ones(tmp_path):
    cfg = compose_config(
        ["+experiment=digits_smile", "method=finetune_l2", "method.regularizers=[dleta]"],
        tmp_path,
        tmp_path,
    )
    with pytest.raises(ValueError, match="unknown regulariser 'dleta'; known: .*delta.*mixup"):
        resolve_regularizers(cfg.method.regularizers, cfg)


def test_delta_with_mixup_trains_end_to_end(make_cfg, tmp_path):
    cfg = make_cfg(
        "+experiment=digits_smile",
        "method=delta_mixup",
        "pretraining.epochs=1",
        "steps.finetune=6",
        "val_every_n_steps=3",
        f"pretraining.cache_dir={tmp_path / 'pre'}",
        "+method.regularizer_options.delta.num_images=32",
        f"+method.regularizer_options.delta.cache_dir={tmp_path / 'delta'}",
        "trainer.log_every_n_steps=1",
    )
    metrics = train(cfg)
    assert metrics["total_steps"] == 6
    # at every step the loss is the mixup cross-entropy plus DELTA's penalty (α, β inside it),
    # and the penalty is there: a mixup that dropped it, or a DELTA that ignored mixup, shows
    with (Path(cfg.paths.output_dir) / "csv" / "target" / "metrics.csv").open() as handle:
        rows = [r for r in csv.DictReader(handle) if r["train/loss"]]
    assert len(rows) == 6
    for row in rows:
        mixup, delta = float(row["train/loss_mixup"]), float(row["train/loss_delta"])
        assert delta > 0 and mixup > 0
        assert float(row["train/loss"]) == pytest.approx(mixup + delta, rel=1e-5)
    assert len(list((tmp_path / "delta").glob("*.pt"))) == 1  # channel weights cached


def test_a_regularizer_is_added_by_config_alone(tmp_path):
    """An inline ``_target_`` config in ``method.regularizers``: no Python, no config file."""
    cfg = compose_config(
        [
            "+experiment=digits_smile",
            "method=finetune_l2",
            "method.regularizers=[{_target_:lightning_stl.regularizers.bss.BatchSpectralShrinkage,"
            "eta:0.5,k:2},l2sp]",
        ],
        tmp_path,
        tmp_path,
    )
    _, configs = resolve_regularizers(cfg.method.regularizers, cfg)
    regularizers = [hydra.utils.instantiate(conf) for conf in configs]
    assert [type(r).__name__ for r in regularizers] == ["BatchSpectralShrinkage", "L2SP"]
    assert (regularizers[0].eta, regularizers[0].k) == (0.5, 2)
