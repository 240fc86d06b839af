"""RegSL's loss re-weighting: w = B · softmax(−ℓ / τ), against numpy at temperatures other than 1.

At τ = 1 dividing and multiplying by τ agree, so every check here uses a temperature τ ≠ 1 (the
official τ₀ = 2 is used only where the temperature actually applied is not 1).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_stl.regularizers import RegSL
from lightning_stl.regularizers.regsl import loss_weights


def np_weights(losses: np.ndarray, temperature: float) -> np.ndarray:
    """B · exp(−ℓ_i/τ) / Σ_j exp(−ℓ_j/τ), computed directly in float64."""
    e = np.exp(-losses / temperature)
    return len(losses) * e / e.sum()


def np_per_image_ce(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -log_p[np.arange(len(labels)), labels]


@pytest.mark.parametrize("temperature", [2.0, 0.5, 3.7])
def test_loss_weights_are_b_times_softmax_of_minus_loss_over_tau(temperature):
    """``loss_weights(ℓ, τ)`` is B·softmax(−ℓ/τ): numpy's values, mean 1, lower for higher loss."""
    losses = np.array([0.1, 0.7, 2.5, 1.2, 0.05, 3.0])
    weights = loss_weights(torch.from_numpy(losses), temperature).numpy()
    expected = np_weights(losses, temperature)
    np.testing.assert_allclose(weights, expected, rtol=1e-12, atol=0)
    assert weights.mean() == pytest.approx(1.0, rel=1e-12)
    order = np.argsort(losses)
    assert np.all(np.diff(weights[order]) < 0)


def test_a_higher_temperature_flattens_the_weights():
    """τ → large makes the weights uniform, τ small concentrates them on the lowest loss."""
    losses = torch.tensor([0.2, 1.0, 2.0, 4.0], dtype=torch.float64)
    spread = [float(loss_weights(losses, t).std()) for t in (0.25, 0.5, 2.0, 8.0)]
    assert spread == sorted(spread, reverse=True)
    np.testing.assert_allclose(loss_weights(losses, 1e6).numpy(), np.ones(4), atol=1e-5)
    assert float(loss_weights(losses, 0.01)[0]) == pytest.approx(4.0, rel=1e-9)


@pytest.mark.parametrize("initial", [3.0, 5.0, 0.6])
def test_supervised_loss_far_into_training_is_the_reweighted_cross_entropy(initial):
    """Long after the start of re-weighting, τ = 0.5·τ₀ (the clamp) under either epoch counting,
    and the loss is mean_i w_i ℓ_i with w = B·softmax(−ℓ/τ), computed in numpy."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(8, 5)) * 2.0
    labels = rng.integers(0, 5, size=8)
    # correction off: the labels stay as given, so only the re-weighting acts
    regsl = RegSL(threshold=0.9, correct_epoch=None, reweight_epoch=3, temperature=initial)
    loss = regsl.supervised_loss(torch.from_numpy(logits), torch.from_numpy(labels), epoch=50)
    per_image = np_per_image_ce(logits, labels)
    tau = 0.5 * initial  # exp(−0.1·(50 − 3)) and exp(−0.1·(51 − 3)) are both below 0.5
    expected = float(np.mean(np_weights(per_image, tau) * per_image))
    assert loss.item() == pytest.approx(expected, rel=1e-10), (
        f"supervised_loss={loss.item():.8f}; with w = B·softmax(−ℓ/τ), τ={tau}: {expected:.8f}; "
        f"with w = B·softmax(−ℓ·τ): {np.mean(np_weights(per_image, 1 / tau) * per_image):.8f}"
    )


def test_supervised_loss_at_a_hand_computed_temperature():
    """In the 1-based epoch e the official trainer re-weights with τ = τ₀·max(0.5, exp(−0.1·k)),
    k = e − 1 − A (A = reweight_epoch): τ is lowered at the end of each epoch after the A-th. For
    e = 5, A = 2 that is k = 2; a multiplied τ would give another loss."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(7, 4)) * 3.0
    labels = rng.integers(0, 4, size=7)
    regsl = RegSL(correct_epoch=None, reweight_epoch=2, temperature=2.0)
    loss = regsl.supervised_loss(torch.from_numpy(logits), torch.from_numpy(labels), epoch=5)
    per_image = np_per_image_ce(logits, labels)
    tau = 2.0 * max(0.5, np.exp(-0.1 * 2))
    expected = float(np.mean(np_weights(per_image, tau) * per_image))
    neighbours = [
        float(np.mean(np_weights(per_image, 2.0 * max(0.5, np.exp(-0.1 * k))) * per_image))
        for k in (1, 3)
    ]
    wrong = float(np.mean(np_weights(per_image, 1 / tau) * per_image))
    assert all(abs(expected - v) > 1e-4 for v in [*neighbours, wrong])  # the check can tell them
    assert loss.item() == pytest.approx(expected, rel=1e-10), (
        f"supervised_loss={loss.item():.8f}; τ={tau:.6f} (k = 2) gives {expected:.8f}, "
        f"k = 1 or 3 give {neighbours}, a multiplied τ {wrong:.8f}"
    )


def test_before_reweighting_every_image_counts_the_same():
    """Before the start of re-weighting the loss is the plain mean cross-entropy."""
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(6, 3))
    labels = rng.integers(0, 3, size=6)
    regsl = RegSL(correct_epoch=None, reweight_epoch=20, temperature=2.0)
    loss = regsl.supervised_loss(torch.from_numpy(logits), torch.from_numpy(labels), epoch=1)
    assert loss.item() == pytest.approx(float(np_per_image_ce(logits, labels).mean()), rel=1e-12)
