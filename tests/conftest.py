"""Shared fixtures: composed Hydra configs for tiny runs on the embedded digits pair."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

#: Overrides that make a run take a few seconds on a CPU: 400 rendered source images, N = 30,
#: two epochs of 4 steps of 64 + 64 images.
TINY = [
    "data.source_options.num_images=400",
    "data.target_size=30",
    "data.target_batch_size=64",
    "data.source_batch_size=64",
    "epochs.joint=2",
    "epochs.source=2",
    "epochs.target=2",
    "trainer.enable_progress_bar=false",
    "callbacks=none",
    "logger=csv",
]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data folder per test session, so the rendered source digits are made once."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def make_cfg(data_dir: Path, tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose ``conf/config.yaml`` with overrides, writing into ``tmp_path/run``."""

    def _make(*overrides: str, tiny: bool = True, output_dir: Path | None = None) -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(
                "config",
                overrides=[*(TINY if tiny else []), *overrides],
            )
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir or tmp_path / "run")
            cfg.paths.data_dir = str(data_dir)
            cfg.data.root = str(data_dir)
        return cfg

    return _make


@pytest.fixture
def subprocess_env(data_dir: Path) -> dict[str, str]:
    """Environment for ``python -m lightning_stl.run`` with the session's data folder."""
    env = dict(os.environ)
    env["LIGHTNING_STL_DATA"] = str(data_dir)
    return env
