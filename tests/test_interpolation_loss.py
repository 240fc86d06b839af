"""SMILE's interpolation loss (Eq. 6): zero for affine functions, not for non-linear ones, and equal
to an independent numpy computation on a known input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightning_stl.metrics import InterpolationLoss, interpolation_inputs, sample_mixing_weights


def interpolation_loss_of(f, x, x_prime, generator) -> float:
    metric = InterpolationLoss()
    d1, d2, lam = sample_mixing_weights(len(x), generator=generator)
    a, b, c = interpolation_inputs(x, x_prime, d1, d2, lam)
    with torch.no_grad():
        metric.update(f(a), f(b), f(c), lam)
    return float(metric.compute())


def test_an_affine_model_has_zero_interpolation_loss():
    torch.manual_seed(0)
    x, x_prime = torch.randn(64, 3, 4, 4), torch.randn(64, 3, 4, 4)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(48, 10))
    assert interpolation_loss_of(linear, x, x_prime, torch.Generator().manual_seed(1)) < 1e-5


def test_a_non_linear_model_does_not():
    torch.manual_seed(0)
    x, x_prime = torch.randn(64, 3, 4, 4), torch.randn(64, 3, 4, 4)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10))
    assert interpolation_loss_of(mlp, x, x_prime, torch.Generator().manual_seed(1)) > 0.01


def test_eq6_matches_numpy_on_a_known_input():
    f = np.tanh  # elementwise, non-linear
    x = np.array([[0.0, 1.0], [2.0, -1.0]])
    xp = np.array([[1.0, 3.0], [-2.0, 0.5]])
    d1, d2, lam = np.array([0.2, 0.9]), np.array([0.7, 0.1]), np.array([0.25, 0.6])
    mixed_delta = lam * d1 + (1 - lam) * d2
    mixed = (1 - mixed_delta)[:, None] * x + mixed_delta[:, None] * xp
    first = (1 - d1)[:, None] * x + d1[:, None] * xp
    second = (1 - d2)[:, None] * x + d2[:, None] * xp
    expected = np.linalg.norm(
        f(mixed) - (lam[:, None] * f(first) + (1 - lam)[:, None] * f(second)), axis=1
    ).mean()

    t = torch.tensor
    a, b, c = interpolation_inputs(t(x), t(xp), t(d1), t(d2), t(lam))
    metric = InterpolationLoss()
    metric.update(torch.tanh(a), torch.tanh(b), torch.tanh(c), t(lam))
    assert float(metric.compute()) == pytest.approx(expected, rel=1e-9)


def test_mixing_weights_lie_in_the_unit_interval_and_are_reproducible():
    a = sample_mixing_weights(1000, alpha=0.5, generator=torch.Generator().manual_seed(3))
    b = sample_mixing_weights(1000, alpha=0.5, generator=torch.Generator().manual_seed(3))
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v) and float(u.min()) >= 0 and float(u.max()) <= 1
    assert abs(float(a[0].mean()) - 0.5) < 0.05
    with pytest.raises(ValueError, match="alpha=0"):
        sample_mixing_weights(3, alpha=0)
