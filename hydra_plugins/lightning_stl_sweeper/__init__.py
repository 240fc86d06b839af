"""Registers ``hydra/sweeper=durable_optuna`` (:class:`lightning_stl.sweeper.DurableOptunaSweeper`)
and its samplers ``hydra/sweeper/sampler=tpe|random|cmaes|gp|qmc|nsgaii``.

Hydra imports every module of the ``hydra_plugins`` namespace package at start-up, which stores
these configs in Hydra's ConfigStore. The schema is hydra-optuna-sweeper's (``sampler``,
``direction``, ``storage``, ``study_name``, ``n_trials``, ``n_jobs``, ``max_failure_rate``,
``params``, ``custom_search_space``), so configs written for it work unchanged; it is written here
because that package pins ``optuna<3``.
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class SamplerConfig:
    _target_: str = MISSING


@dataclass
class TPESamplerConfig(SamplerConfig):
    """optuna.samplers.TPESampler: ``n_startup_trials`` random trials, then TPE; trials asked
    in a batch see each other's pending points (``constant_liar``)."""

    _target_: str = "optuna.samplers.TPESampler"
    seed: int | None = None
    n_startup_trials: int = 10
    n_ei_candidates: int = 24
    multivariate: bool = False
    group: bool = False
    constant_liar: bool = True
    warn_independent_sampling: bool = True
    # hydra-optuna-sweeper's fields that Optuna 4.9 deprecates: null keeps Optuna's default
    consider_prior: bool | None = None
    prior_weight: float | None = None
    consider_magic_clip: bool | None = None
    consider_endpoints: bool | None = None


@dataclass
class RandomSamplerConfig(SamplerConfig):
    _target_: str = "optuna.samplers.RandomSampler"
    seed: int | None = None


@dataclass
class CmaEsSamplerConfig(SamplerConfig):
    _target_: str = "optuna.samplers.CmaEsSampler"
    seed: int | None = None
    sigma0: float | None = None
    n_startup_trials: int = 1
    warn_independent_sampling: bool = True


@dataclass
class GPSamplerConfig(SamplerConfig):
    _target_: str = "optuna.samplers.GPSampler"
    seed: int | None = None
    n_startup_trials: int = 10


@dataclass
class QMCSamplerConfig(SamplerConfig):
    _target_: str = "optuna.samplers.QMCSampler"
    seed: int | None = None
    qmc_type: str = "sobol"
    scramble: bool = False


@dataclass
class NSGAIISamplerConfig(SamplerConfig):
    _target_: str = "optuna.samplers.NSGAIISampler"
    seed: int | None = None
    population_size: int = 50


@dataclass
class DurableOptunaSweeperConf:
    _target_: str = "hydra_plugins.lightning_stl_sweeper.durable_optuna.DurableOptunaSweeper"
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}])
    sampler: SamplerConfig = MISSING
    direction: Any = "minimize"
    # sqlite:///path.db, postgresql://..., or journal:///path.log (Optuna's JournalStorage)
    storage: Any | None = None
    study_name: str | None = None
    n_trials: int = 20
    n_jobs: int = 2
    max_failure_rate: float = 0.0
    params: dict[str, str] | None = None
    custom_search_space: str | None = None
    # Name of this sweep process; each process sharing one study needs its own.
    worker: str = "0"
    # Value recorded for a trial that returns NaN or inf (the worst accuracy).
    failure_value: float = 0.0


_store = ConfigStore.instance()
_store.store(
    group="hydra/sweeper",
    name="durable_optuna",
    node=DurableOptunaSweeperConf,
    provider="lightning_stl",
)
for _name, _node in {
    "tpe": TPESamplerConfig,
    "random": RandomSamplerConfig,
    "cmaes": CmaEsSamplerConfig,
    "gp": GPSamplerConfig,
    "qmc": QMCSamplerConfig,
    "nsgaii": NSGAIISamplerConfig,
}.items():
    _store.store(group="hydra/sweeper/sampler", name=_name, node=_node, provider="lightning_stl")
