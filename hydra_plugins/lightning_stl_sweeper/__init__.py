"""Registers ``hydra/sweeper=durable_optuna`` (:class:`lightning_stl.sweeper.DurableOptunaSweeper`).

Hydra imports every module of the ``hydra_plugins`` namespace package at start-up, which stores
this config in Hydra's ConfigStore.
"""

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf


@dataclass
class DurableOptunaSweeperConf(OptunaSweeperConf):
    _target_: str = "hydra_plugins.lightning_stl_sweeper.durable_optuna.DurableOptunaSweeper"
    # Name of this sweep process; each process sharing one study needs its own.
    worker: str = "0"
    # Value recorded for a trial that returns NaN or inf (the worst accuracy).
    failure_value: float = 0.0


ConfigStore.instance().store(
    group="hydra/sweeper",
    name="durable_optuna",
    node=DurableOptunaSweeperConf,
    provider="lightning_stl",
)
