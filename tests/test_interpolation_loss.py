"""SMILE's interpolation loss (Eq. 6): zero for affine functions, not for non-linear ones, and equal
to an independent numpy computation on a known input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightning_stl.metrics import (
    InterpolationLoss,
    interpolation_inputs,
    sample_mixing_weights,
)
from lightning_stl.regularizers.mixup import MixupPairs, mix


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
    # Mix_δ(x, x') = δ·x + (1 − δ)·x', as MixupPairs.mix writes λ·u + (1 − λ)·u[π]
    mixed = mixed_delta[:, None] * x + (1 - mixed_delta)[:, None] * xp
    first = d1[:, None] * x + (1 - d1)[:, None] * xp
    second = d2[:, None] * x + (1 - d2)[:, None] * xp
    expected = np.linalg.norm(
        f(mixed) - (lam[:, None] * f(first) + (1 - lam)[:, None] * f(second)), axis=1
    ).mean()

    t = torch.tensor
    a, b, c = interpolation_inputs(t(x), t(xp), t(d1), t(d2), t(lam))
    metric = InterpolationLoss()
    metric.update(torch.tanh(a), torch.tanh(b), torch.tanh(c), t(lam))
    assert float(metric.compute()) == pytest.approx(expected, rel=1e-9)


def test_the_metric_mixes_as_mixup_does():
    """Mix_λ(u, v) of the metric is MixupPairs.mix's λ·u + (1 − λ)·u[π] with v = u[π]."""
    u = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pairs = MixupPairs(0.3, torch.tensor([2, 0, 1, 5, 3, 4]))
    expected = 0.3 * u + 0.7 * u[pairs.permutation]
    assert torch.allclose(pairs.mix(u), expected)
    weight = torch.full((6,), 0.3, dtype=torch.float64)
    assert torch.allclose(mix(u, u[pairs.permutation], weight), expected)


def test_mixing_weights_lie_in_the_unit_interval_and_are_reproducible():
    a = sample_mixing_weights(1000, alpha=0.5, generator=torch.Generator().manual_seed(3))
    b = sample_mixing_weights(1000, alpha=0.5, generator=torch.Generator().manual_seed(3))
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v) and float(u.min()) >= 0 and float(u.max()) <= 1
    generator = torch.Generator().manual_seed(3)
    state = torch.get_rng_state()
    first = sample_mixing_weights(1000, alpha=0.5, generator=generator)
    second = sample_mixing_weights(1000, alpha=0.5, generator=generator)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's global RNG is not used
    assert torch.equal(first[0], a[0]) and not torch.equal(second[0], a[0])  # the generator moves
    assert abs(float(a[0].mean()) - 0.5) < 0.05
    with pytest.raises(ValueError, match="alpha=0"):
        sample_mixing_weights(3, alpha=0)


# ---------------------------------------------------------------------------- Beta(α, α) draws


def _draws(alpha: float, seeded_generator: bool, n: int = 1000) -> np.ndarray:
    """δ1, δ2, λ of ``sample_mixing_weights`` for ``n`` samples, pooled, as float64 numpy.

    Not many more: the float32 draws of Beta(0.2, 0.2) put the ~2 % of its mass that lies within
    6e-8 of 1 on one float (1 or 1 − 6e-8), a CDF step of ~0.02 that a KS test of ~10^4 samples
    notices; 3,000 samples do not, and still reject the wrong α by p-values below 1e-20.
    """
    if seeded_generator:
        weights = sample_mixing_weights(n, alpha, generator=torch.Generator().manual_seed(11))
    else:
        torch.manual_seed(11)
        weights = sample_mixing_weights(n, alpha)
    return torch.cat(weights).double().numpy()


@pytest.mark.parametrize("seeded_generator", [False, True], ids=["global_rng", "generator"])
@pytest.mark.parametrize("alpha", [0.2, 2.0])
def test_mixing_weights_follow_beta_alpha_alpha(alpha, seeded_generator):
    """δ1, δ2 and λ are Beta(α, α) for the α given: a KS test against scipy's Beta(α, α) accepts
    them, and rejects them against the Beta of the other α and against the uniform Beta(1, 1)."""
    from scipy import stats

    draws = _draws(alpha, seeded_generator)
    p_same = stats.kstest(draws, stats.beta(alpha, alpha).cdf).pvalue
    assert p_same > 1e-3, f"draws for α={alpha} are not Beta({alpha}, {alpha}): KS p={p_same:.2e}"
    other = 2.0 if alpha == 0.2 else 0.2
    p_other = stats.kstest(draws, stats.beta(other, other).cdf).pvalue
    assert p_other < 1e-10, f"draws for α={alpha} pass as Beta({other}, {other}): p={p_other:.2e}"
    p_uniform = stats.kstest(draws, stats.uniform.cdf).pvalue
    assert p_uniform < 1e-10, f"draws for α={alpha} pass as uniform: KS p={p_uniform:.2e}"
    # each of the three is Beta(α, α) on its own (mean 1/2, variance 1 / (4(2α + 1)))
    for part in draws.reshape(3, -1):
        assert part.var() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.1)
