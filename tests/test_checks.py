"""The shared setting checks (lightning_stl/checks.py): what passes, and the one message form."""

from __future__ import annotations

import re

import numpy as np
import pytest
from omegaconf import OmegaConf

from lightning_stl.checks import choice, flag, integer, number


@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf"), True, "0.1", None])
def test_a_bad_number_is_named_with_its_value(value):
    with pytest.raises(ValueError, match=re.escape(f"gamma_fe={value!r} is not allowed")):
        number("gamma_fe", value, at_least=0)


def test_a_good_number_comes_back_as_a_float():
    assert number("g", 0, at_least=0) == 0.0 and isinstance(number("g", 3, above=0), float)
    assert number("g", 0.5, above=0, below=1) == 0.5


@pytest.mark.parametrize(
    ("bounds", "value", "allowed"),
    [
        ({"above": 0}, 0, "a finite number > 0"),
        ({"at_least": 0}, -1, "a finite number >= 0"),
        ({"above": 0, "below": 1}, 1, r"a finite number in \(0, 1\)"),
        ({"at_least": 0, "below": 1}, 1.0, r"a finite number in \[0, 1\)"),
        ({"above": 0, "at_most": 1}, 1.5, r"a finite number in \(0, 1\]"),
    ],
)
def test_a_number_out_of_its_bounds_says_which_bounds(bounds, value, allowed):
    with pytest.raises(ValueError, match=rf"x={value!r} is not allowed: it must be {allowed}$"):
        number("x", value, **bounds)
    edge = next(iter(bounds.values()))
    inside = edge + 0.25 if "above" in bounds or "at_least" in bounds else edge - 0.25
    assert number("x", inside, **bounds) == inside


def test_integers():
    assert integer("n", 3, low=1) == 3 and integer("n", None, null=True) is None
    assert integer("n", np.int64(4), low=1) == 4 and type(integer("n", np.int64(4))) is int
    assert number("x", np.float32(0.5), above=0) == 0.5
    for bad in (0, 2.5, True, "3", None):
        with pytest.raises(
            ValueError, match=rf"n={bad!r} is not allowed: it must be an integer >= 1"
        ):
            integer("n", bad, low=1)
    with pytest.raises(ValueError, match=r"it must be an integer in \[1, 3\], or null"):
        integer("n", 4, 1, 3, null=True, also="null")
    node = OmegaConf.create({"n": [1, 2]})
    with pytest.raises(ValueError, match=r"n=\[1, 2\] is not allowed"):  # not ListConfig(...)
        integer("n", node.n)


def test_choices_and_flags():
    assert choice("form", "paper", ("paper", "official")) == "paper"
    with pytest.raises(
        ValueError, match="form='tllib' is not allowed: choose one of paper, official"
    ):
        choice("form", "tllib", ("paper", "official"))
    assert flag("f", False) is False
    for bad in (0, 1, "yes", None):
        with pytest.raises(
            ValueError, match=rf"f={bad!r} is not allowed: it must be true or false"
        ):
            flag("f", bad)


def test_the_paired_difference_is_the_paired_t_interval():
    """Differences 1, 2, 3, 6: mean 3, sd √(14/3), t_{3, 0.975} = 3.182446305284263."""
    import math

    from lightning_stl.reporting.tables import paired_difference

    mean, low, high, n = paired_difference([10, 10, 10, 10], [11, 12, 13, 16])
    half = 3.182446305284263 * math.sqrt(14 / 3) / 2
    assert n == 4 and mean == 3
    assert low == pytest.approx(3 - half) and high == pytest.approx(3 + half)
    assert paired_difference([1.0], [2.0])[1:3] == (-math.inf, math.inf)
    with pytest.raises(ValueError, match="as many"):
        paired_difference([1.0], [1.0, 2.0])
