"""Shared fixtures: composed Hydra configs for tiny runs on the embedded digits pair."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig

from lightning_stl.run import compose_config
from lightning_stl.schedule import TargetWeightSchedule

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


# ---------------------------------------------------------------------------- shared helpers
class TargetBatches(torch.utils.data.Dataset):
    """Random 8x8 one-channel images with ``num_classes`` labels as FineTune's
    ``{"target": (x, y)}`` batches (seeded: the same images in every test)."""

    def __init__(self, n: int = 64, num_classes: int = 4):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 1, 8, 8, generator=generator)
        self.y = torch.randint(0, num_classes, (n,), generator=generator)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {"target": (self.x[i], self.y[i])}


def bare_trainer(callbacks: list[Any], max_steps: int, **kwargs: Any) -> Any:
    """A CPU ``Trainer`` that only trains: no logger, checkpoint, bar, summary or validation."""
    import lightning as L

    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        **kwargs,
    )


def cause_chain(error: BaseException | None) -> list[BaseException]:
    """``error`` and every exception it was raised from or during, outermost first."""
    chain = []
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def checkpoint_state(path: Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a Lightning checkpoint, read on the CPU (``weights_only``)."""
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def final_state(run_dir: Path, stage: str) -> dict[str, torch.Tensor]:
    """The weights in ``last.ckpt`` of ``stage`` of the run in ``run_dir``."""
    return checkpoint_state(Path(run_dir) / "checkpoints" / stage / "last.ckpt")


class StepTargetWeight(TargetWeightSchedule):
    """The tests' independent Eq. 5 (what SigmoidTargetWeight must give as τ → 0): source only (λ = 0) before t = T/2 + t0, target only (λ = 1) after.

    ``t0`` is a fraction of T when ``relative`` is true. At t = T/2 + t0 exactly, Eq. 5 is silent;
    this takes the limit of Eq. 4 with τ → 0 there, (1 + e^α)^−1, with ``alpha``.
    """

    def __init__(self, t0: float = 0.0, alpha: float = 0.0, relative: bool = True):
        self.t0 = float(t0)
        self.alpha = float(alpha)
        self.relative = bool(relative)

    def __call__(self, step: int, total_steps: int) -> float:
        switch = total_steps / 2 + (self.t0 * total_steps if self.relative else self.t0)
        if step < switch:
            return 0.0
        if step > switch:
            return 1.0
        return 1.0 / (1.0 + math.exp(self.alpha))

    def describe(self) -> dict[str, Any]:
        return {"schedule": "step", "t0": self.t0, "alpha": self.alpha, "relative": self.relative}
