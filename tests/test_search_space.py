"""The sweep grammar to Optuna distributions, drawn through the public suggest_* API."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from lightning_stl.search_space import parse_search_space, suggest


def test_every_form_of_the_grammar():
    space = parse_search_space(
        [
            "a=choice(x, 2, 3.5, true)",
            "b=range(1, 9, step=2)",
            "c=range(0.0, 1.0, step=0.25)",
            "d=interval(0.0, 1.0)",
            "e=tag(log, interval(1e-4, 1e-1))",
            "f=interval(1, 10)",
            "g=7",
            "~h",
        ]
    )
    d = space.distributions
    assert d["a"] == CategoricalDistribution(["x", 2, 3.5, True])
    assert d["b"] == IntDistribution(1, 9, step=2)
    assert d["c"] == FloatDistribution(0.0, 1.0, step=0.25)
    assert d["d"] == FloatDistribution(0.0, 1.0)
    assert d["e"] == FloatDistribution(1e-4, 1e-1, log=True)
    assert d["f"] == FloatDistribution(1.0, 10.0)  # Hydra's interval is continuous
    assert space.fixed == {"g": "7"} and space.deletions == ["~h"]


def test_a_later_override_of_a_key_wins():
    space = parse_search_space(["x=interval(0, 1.0)", "x=0.5"])
    assert space.distributions == {} and space.fixed == {"x": "0.5"}


def test_suggest_draws_inside_each_distribution_through_the_public_api():
    space = parse_search_space(
        ["a=choice(p, q)", "b=range(1, 9, step=2)", "e=tag(log, interval(1e-4, 1e-1))"]
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        values = {n: suggest(trial, n, dist) for n, dist in space.distributions.items()}
        assert values["a"] in ("p", "q") and values["b"] in (1, 3, 5, 7, 9)
        assert 1e-4 <= values["e"] <= 1e-1
        assert trial.distributions == space.distributions
        study.tell(trial, 0.0)
    assert space.overrides({"a": "p"}) == ["a=p"]


def test_a_bad_sweep_form_is_named():
    with pytest.raises(ValueError, match="glob"):
        parse_search_space(["x=glob(*)"])
