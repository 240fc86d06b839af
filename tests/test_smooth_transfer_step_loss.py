"""Eq. 3 in a real training run: the loss of every step is λ(t)·CE_T + (1 − λ(t))·CE_S.

A callback copies the model just before each optimiser step (so it holds the weights that step
starts from) and keeps the step's batch; after the step it recomputes the two cross-entropies by
hand (float64 log-softmax in numpy) from the copy's logits and compares the step's loss with the
λ(t) that the run logged in ``target_weight.csv``. A schedule that weighed the two terms with any
other value than the logged λ(t) (e.g. a fixed 0.5 whenever 0 < λ < 1) fails.
"""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

import lightning_stl.stages as stages_module
from lightning_stl.run import train

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def np_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean of −log softmax(z)_y over the batch, in float64 numpy."""
    z = logits.detach().double().numpy()
    z = z - z.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    y = labels.numpy()
    return float(-log_probs[np.arange(len(y)), y].mean())


class StepLossRecorder(Callback):
    """Per optimiser step t: the step's loss and CE_T, CE_S of the pre-step weights on its batch."""

    def __init__(self):
        self.steps: dict[int, dict[str, float]] = {}
        self._model = None
        self._batch = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # the batch arrives preprocessed (on_after_batch_transfer ran); the copy has the weights
        # this step starts from, and is in train mode like the module (BatchNorm batch statistics)
        self._model = copy.deepcopy(pl_module.model).train()
        self._batch = {domain: (x.clone(), y.clone()) for domain, (x, y) in batch.items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        model, (xt, yt), (xs, ys) = self._model, self._batch["target"], self._batch["source"]
        with torch.no_grad():
            # shared BatchNorm: one backbone pass over [target; source], as Eq. 3 is trained
            features = model.backbone(torch.cat([xt, xs]))
            target_logits = model.target_head(features[: len(xt)])
            source_logits = model.source_head(features[len(xt) :])
        self.steps[trainer.global_step] = {  # global_step is now t (1-based step just taken)
            "loss": float(outputs["loss"]),
            "ce_target": np_cross_entropy(target_logits, yt),
            "ce_source": np_cross_entropy(source_logits, ys),
        }


def logged_weights(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "target_weight.csv") as handle:
        return {int(r["stage_step"]): float(r["target_weight"]) for r in csv.DictReader(handle)}


@pytest.mark.parametrize(
    "overrides",
    [
        # Eq. 4 with a slow switch off the middle: λ(t) sweeps (0, 1) and never hits 0.5
        ("method.target_weight.tau=0.2", "method.target_weight.t0=0.1"),
        # Eq. 6: multi-task learning with a fixed λ = 0.3
        ("method=multitask", "method.weight=0.3"),
    ],
    ids=["sigmoid", "multitask"],
)
def test_each_step_loss_is_eq3_with_the_logged_target_weight(make_cfg, monkeypatch, overrides):
    """Every step's loss equals λ(t)·CE_T + (1 − λ(t))·CE_S by hand, with the logged λ(t)."""
    recorder = StepLossRecorder()
    original = stages_module.stage_callbacks
    monkeypatch.setattr(
        stages_module, "stage_callbacks", lambda *args: [*original(*args), recorder], raising=True
    )
    # no dropout: the hand forward must see the network the step saw; float32, as the hand one
    cfg = make_cfg(
        *overrides, "backbone.options.drop_rate=0.0", "batchnorm=shared", "speed.fast_mode=false"
    )
    metrics = train(cfg)
    weights = logged_weights(Path(cfg.paths.output_dir))
    assert sorted(recorder.steps) == sorted(weights) == list(range(1, metrics["total_steps"] + 1))

    informative = 0  # steps where another weight (0.5) would have given a visibly other loss
    for t, step in recorder.steps.items():
        lam = weights[t]
        assert 0.0 < lam < 1.0, f"step {t}: λ={lam} is not in between"
        expected = lam * step["ce_target"] + (1 - lam) * step["ce_source"]
        assert step["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6), (
            f"step {t}: loss {step['loss']:.6f} != λ·CE_T + (1−λ)·CE_S = {expected:.6f} "
            f"(λ={lam:.4f}, CE_T={step['ce_target']:.6f}, CE_S={step['ce_source']:.6f})"
        )
        half = 0.5 * (step["ce_target"] + step["ce_source"])
        informative += abs(half - expected) > 1e-3
    assert informative >= 3, "the run's λ and cross-entropies cannot tell λ from 0.5"
