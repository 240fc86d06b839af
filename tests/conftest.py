"""Shared fixtures: composed Hydra configs for tiny runs on the embedded digits pair."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from lightning_stl.run import compose_config

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = str(ROOT / "conf")

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
        return compose_config(
            [*(TINY if tiny else []), *overrides], output_dir or tmp_path / "run", data_dir
        )

    return _make


@pytest.fixture
def subprocess_env(data_dir: Path) -> dict[str, str]:
    """Environment for ``python -m lightning_stl.run`` with the session's data folder."""
    env = dict(os.environ)
    env["LIGHTNING_STL_DATA"] = str(data_dir)
    return env


@pytest.fixture
def run_cli(subprocess_env: dict[str, str]) -> Callable[..., subprocess.CompletedProcess]:
    """Run ``python -m lightning_stl.run *args`` from the project folder; its output captured."""

    def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "lightning_stl.run", *args],
            cwd=ROOT,
            env=subprocess_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return _run


@pytest.fixture
def one_thread():
    """Tiny models on shared cores: one thread avoids oversubscription (and is faster). A module
    takes it for all its tests with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
