"""Eq. 4–6 of Smooth Transfer Learning, computed independently and compared."""

from __future__ import annotations

import math
import warnings
from decimal import Decimal, getcontext

import numpy as np
import pytest

from lightning_stl.schedule import (
    ConstantTargetWeight,
    SigmoidTargetWeight,
    sigmoid_target_weight,
)
from tests.conftest import StepTargetWeight


def eq4_reference(t: float, T: float, t0: float, tau: float, alpha: float) -> float:
    """Eq. 4 in 50-digit decimal arithmetic, written straight from the paper."""
    getcontext().prec = 50
    exponent = -(Decimal(t) - Decimal(T) / 2 - Decimal(t0)) / Decimal(tau) + Decimal(alpha)
    return float(1 / (1 + exponent.exp()))


@pytest.mark.parametrize(
    ("t", "T", "t0", "tau", "alpha"),
    [
        (1, 1000, 0.0, 100.0, 0.0),
        (500, 1000, 0.0, 100.0, 0.0),
        (750, 1000, -100.0, 37.5, 1.3),
        (10, 1000, 250.0, 5.0, -2.0),
        (999, 1000, 400.0, 1e4, 3.0),
    ],
)
def test_eq4_matches_high_precision_reference(t, T, t0, tau, alpha):
    assert sigmoid_target_weight(t, T, t0, tau, alpha) == pytest.approx(
        eq4_reference(t, T, t0, tau, alpha), rel=1e-12, abs=1e-300
    )


def test_eq4_known_values():
    # At the centre t = T/2 + t0 the weight is (1 + e^α)^−1; one τ later it is σ(1 − α).
    assert sigmoid_target_weight(600, 1000, 100, 20, 0.0) == 0.5
    assert sigmoid_target_weight(600, 1000, 100, 20, math.log(3)) == pytest.approx(0.25)
    assert sigmoid_target_weight(620, 1000, 100, 20, 0.0) == pytest.approx(1 / (1 + math.exp(-1)))


def test_tau_to_zero_is_exactly_the_step_of_eq5():
    T, t0 = 1000, 123.0
    sched = SigmoidTargetWeight(t0=t0, tau=1e-9, alpha=0.7, relative=False)
    step = StepTargetWeight(t0=t0, alpha=0.7, relative=False)
    switch = T / 2 + t0
    for t in range(1, T + 1):
        if t == switch:  # Eq. 5 is silent at the switch; both take Eq. 4's value there
            assert sched(t, T) == step(t, T) == 1 / (1 + math.exp(0.7))
            continue
        expected = 0.0 if t < switch else 1.0
        assert sched(t, T) == expected
        assert step(t, T) == expected


@pytest.mark.parametrize("alpha", [-5.0, 0.0, 0.3, 8.0])
def test_tau_to_infinity_is_exactly_the_constant_of_eq6(alpha):
    T = 1000
    constant = 1.0 / (1.0 + math.exp(alpha))
    for tau in (1e30, math.inf):
        sched = SigmoidTargetWeight(t0=0.2, tau=tau, alpha=alpha)
        values = sched.curve(T)
        assert np.all(values == constant)


def test_relative_and_absolute_forms_give_identical_values():
    for T in (37, 1000, 123_457):
        rel = SigmoidTargetWeight(t0=0.13, tau=0.021, alpha=-0.4, relative=True)
        t0, tau, alpha = rel.absolute(T)
        absolute = SigmoidTargetWeight(t0=t0, tau=tau, alpha=alpha, relative=False)
        for t in np.linspace(1, T, 50).astype(int):
            assert rel(int(t), T) == absolute(int(t), T)
        assert (t0, tau) == (0.13 * T, 0.021 * T)


def test_extreme_omega_never_gives_nan_or_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise"):
            for tau in (5e-324, 1e-300, 1e-12, 1.0, 1e300, math.inf):
                for alpha in (-1e308, -700.0, 0.0, 700.0, 1e308):
                    for t0 in (-1e308, 0.0, 1e308):
                        for t in (1, 500, 1000):
                            w = sigmoid_target_weight(t, 1000, t0, tau, alpha)
                            assert 0.0 <= w <= 1.0 and not math.isnan(w)


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan")])
def test_non_positive_tau_is_rejected_with_the_value(tau):
    with pytest.raises(ValueError, match=r"tau=.*must be > 0"):
        SigmoidTargetWeight(tau=tau)


@pytest.mark.parametrize("name", ["t0", "alpha"])
def test_non_finite_offsets_are_rejected(name):
    with pytest.raises(ValueError, match=name):
        SigmoidTargetWeight(**{name: math.inf})


def test_constant_weight_domains_and_range():
    assert ConstantTargetWeight(1.0).domains() == ("target",)
    assert ConstantTargetWeight(0.0).domains() == ("source",)
    assert ConstantTargetWeight(0.3).domains() == ("target", "source")
    with pytest.raises(ValueError, match=r"value=1.5"):
        ConstantTargetWeight(1.5)


def test_sigmoid_is_monotone_in_t():
    values = SigmoidTargetWeight(t0=-0.1, tau=0.05, alpha=0.5).curve(500)
    assert np.all(np.diff(values) >= 0)
    assert values[0] < 0.01 and values[-1] > 0.99
