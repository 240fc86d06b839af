"""One GPU per run when several runs share a machine, or k runs per GPU (``trials_per_device``).

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
from collections.abc import Callable, Iterator
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


def free_device_memory(index: int) -> float:
    """Free memory (bytes) of the visible CUDA device ``index``.

    Read from ``nvidia-smi``, as NVML reports it, for the device's UUID (NVML numbers devices by
    PCI bus, CUDA fastest first: only the UUID names the same GPU for both):
    ``torch.cuda.mem_get_info`` would create a CUDA context (some hundred MB) on every device it
    is asked about, in a process that then trains on only one of them. Without ``nvidia-smi``,
    or where it cannot tell (a MIG slice: ``[N/A]``), it falls back to ``mem_get_info``.
    """
    import shutil
    import subprocess

    import torch

    smi = shutil.which("nvidia-smi")
    if smi is not None:
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        name = uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
        query = [smi, "--query-gpu=memory.free", "--format=csv,noheader,nounits", "-i", name]
        try:
            done = subprocess.run(query, capture_output=True, text=True, timeout=30, check=True)
            return float(done.stdout.split()[0]) * 2**20  # MiB
        except (OSError, subprocess.SubprocessError, ValueError, IndexError) as error:
            log.warning("nvidia-smi could not read device %s (%s): asking CUDA", name, error)
    return float(torch.cuda.mem_get_info(index)[0])


@contextmanager
def claim_device(
    num_devices: int,
    lock_dir: str | Path,
    poll_seconds: float = 1.0,
    names: list[str] | None = None,
    trials_per_device: int = 1,
    free_memory: Callable[[int], float] | None = None,
    min_free_bytes: float = 0.0,
) -> Iterator[int]:
    """Hold one of ``num_devices × trials_per_device`` device slots (waiting until one is free);
    yield its device index.

    ``names`` (one per device) name the lock files; by default the indices. Slots are filled
    across devices first (every device's first slot, then the second ones), so k trials on k GPUs
    never share one. A device's second and later slots are taken only while ``free_memory(index)``
    (bytes; ``torch.cuda.mem_get_info`` in a run) is at least ``min_free_bytes``: a trial that
    would not fit waits for a slot instead of running out of memory.
    """
    if num_devices < 1:
        raise ValueError(f"num_devices={num_devices} is not allowed: it must be >= 1")
    if trials_per_device < 1:
        raise ValueError(
            f"device_pool.trials_per_device={trials_per_device} is not allowed: it must be >= 1"
        )
    names = names or [str(i) for i in range(num_devices)]
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        for slot in range(trials_per_device):
            for index in range(num_devices):
                if slot > 0 and free_memory is not None and free_memory(index) < min_free_bytes:
                    continue
                suffix = f".slot{slot}" if slot else ""  # slot 0 keeps the one-trial file name
                handle = open(lock_dir / f"device{names[index]}{suffix}.lock", "a+")  # noqa: SIM115 (held while yielding)
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    handle.close()
                    continue
                try:
                    log.info("using device %d, slot %d (lock %s)", index, slot, handle.name)
                    yield index
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
                    handle.close()
                return
        if not waited:
            log.info(
                "all %d x %d device slots are in use; waiting for one to be free",
                num_devices,
                trials_per_device,
            )
            waited = True
        time.sleep(poll_seconds)


def wants_device_pool(
    accelerator: str,
    devices: object,
    cuda_devices: int,
    enabled: object,
    trials_per_device: int = 1,
) -> bool:
    """Whether a run should claim one GPU slot from the pool.

    ``enabled`` is ``true``, ``false`` or ``auto`` (a single-device run on a machine with more than
    one CUDA device, or with one when several trials share a device).
    """
    if enabled is False or str(enabled).lower() == "false":
        return False
    single = devices in (1, "1")
    on_gpu = str(accelerator).lower() in ("auto", "gpu", "cuda")
    if enabled is True or str(enabled).lower() == "true":
        return single and on_gpu and cuda_devices >= 1
    return single and on_gpu and (cuda_devices > 1 or (cuda_devices == 1 and trials_per_device > 1))


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
