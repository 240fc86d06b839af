"""Registers ``hydra/sweeper=durable_optuna`` (:class:`lightning_stl.sweeper.DurableOptunaSweeper`)
its samplers ``hydra/sweeper/sampler=tpe|random|cmaes|gp|qmc|nsgaii`` and its pruners
``hydra/sweeper/pruner=successive_halving|hyperband`` (with ``hydra.sweeper.fidelity``: the
multi-fidelity search of :mod:`lightning_stl.sweep_rungs`).

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
class PrunerConfig:
    _target_: str = MISSING


@dataclass
class SuccessiveHalvingPrunerConfig(PrunerConfig):
    """optuna.pruners.SuccessiveHalvingPruner (asynchronous successive halving): a trial climbs
    from rung k (step min_resource · η^k) if it is in the best 1/η there."""

    _target_: str = "optuna.pruners.SuccessiveHalvingPruner"
    min_resource: Any = 1
    reduction_factor: int = 2
    min_early_stopping_rate: int = 0
    bootstrap_count: int = 0


@dataclass
class HyperbandPrunerConfig(PrunerConfig):
    """optuna.pruners.HyperbandPruner: several successive-halving brackets of different
    aggressiveness; TPE models each bracket's trials apart. The defaults match the rungs 1/8,
    1/4, 1/2, 1 (resources 1, 2, 4, 8: sweep_rungs.Rungs.resource); for other rungs set
    max_resource to the last rung over the first."""

    _target_: str = "optuna.pruners.HyperbandPruner"
    min_resource: int = 1
    max_resource: Any = 8
    reduction_factor: int = 2
    bootstrap_count: int = 0


@dataclass
class FidelityConfig:
    """A trial's runs of growing length (lightning_stl/sweep_rungs.py): ``key`` is set to each of
    ``rungs`` in turn (fractions of the run length, the last 1.0) while the pruner promotes it."""

    key: str = "run_fraction"
    rungs: list[float] = field(default_factory=lambda: [0.125, 0.25, 0.5, 1.0])


@dataclass
class DurableOptunaSweeperConf:
    _target_: str = "hydra_plugins.lightning_stl_sweeper.durable_optuna.DurableOptunaSweeper"
    # _self_ first: the sampler and pruner chosen in the groups win over the fields below
    defaults: list[Any] = field(
        default_factory=lambda: ["_self_", {"sampler": "tpe"}, {"pruner": None}]
    )
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
    # Multi-fidelity: hydra/sweeper/pruner=successive_halving|hyperband and a fidelity (rungs).
    pruner: PrunerConfig | None = None
    fidelity: FidelityConfig | None = None


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
for _name, _node in {
    "successive_halving": SuccessiveHalvingPrunerConfig,
    "hyperband": HyperbandPrunerConfig,
}.items():
    _store.store(group="hydra/sweeper/pruner", name=_name, node=_node, provider="lightning_stl")
