"""One GPU per run when several runs share a machine.

Hydra's parallel launchers (joblib on one machine) start k trials at once; each must train on its
own GPU. Instead of deriving the GPU from the job number (which collides as soon as batches and
GPUs are not the same size, or two sweeps share a machine), each run takes an exclusive lock on a
free device slot, a file under ``lock_dir``, for as long as it runs. The operating system drops
the lock when the process ends, killed or not, so a crash never leaves a GPU marked busy.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def physical_device_names(num_devices: int) -> list[str]:
    """Names of the visible CUDA devices that are the same for every process on the machine.

    ``CUDA_VISIBLE_DEVICES`` entries when it is set (so two sweeps that see different subsets lock
    the physical GPUs, not their own numbering), else the indices.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    names = [v.strip() for v in visible.split(",") if v.strip()] if visible else []
    if len(names) >= num_devices:
        return names[:num_devices]
    return [str(i) for i in range(num_devices)]


@contextmanager
def claim_device(
    num_devices: int,
    lock_dir: str | Path,
    poll_seconds: float = 1.0,
    names: list[str] | None = None,
) -> Iterator[int]:
    """Hold one of ``num_devices`` device slots (waiting until one is free); yield its index.

    ``names`` (one per device) name the lock files; by default the indices.
    """
    if num_devices < 1:
        raise ValueError(f"num_devices={num_devices} is not allowed: it must be >= 1")
    names = names or [str(i) for i in range(num_devices)]
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        for index in range(num_devices):
            handle = open(lock_dir / f"device{names[index]}.lock", "a+")  # noqa: SIM115 (held while yielding)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            try:
                log.info("using device %d (lock %s)", index, handle.name)
                yield index
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
            return
        if not waited:
            log.info("all %d devices are in use; waiting for one to be free", num_devices)
            waited = True
        time.sleep(poll_seconds)


def wants_device_pool(
    accelerator: str, devices: object, cuda_devices: int, enabled: object
) -> bool:
    """Whether a run should claim one GPU from the pool.

    ``enabled`` is ``true``, ``false`` or ``auto`` (a single-device run on a machine with more than
    one CUDA device).
    """
    if enabled is False or str(enabled).lower() == "false":
        return False
    single = devices in (1, "1")
    on_gpu = str(accelerator).lower() in ("auto", "gpu", "cuda")
    if enabled is True or str(enabled).lower() == "true":
        return single and on_gpu and cuda_devices >= 1
    return single and on_gpu and cuda_devices > 1


def training_device(cfg: Any, trainer_overrides: dict[str, Any]) -> torch.device:
    """The device the trainer of ``cfg`` will use (the claimed GPU, the first GPU, or the CPU)."""
    import torch  # here: claiming a GPU needs no torch
    from omegaconf import ListConfig

    accelerator = str(trainer_overrides.get("accelerator", cfg.trainer.get("accelerator", "auto")))
    devices = trainer_overrides.get("devices", cfg.trainer.get("devices", "auto"))
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        index = devices[0] if isinstance(devices, list | ListConfig) and devices else 0
        return torch.device(f"cuda:{int(index)}")
    return torch.device("cpu")
