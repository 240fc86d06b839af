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
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


@contextmanager
def claim_device(
    num_devices: int, lock_dir: str | Path, poll_seconds: float = 1.0
) -> Iterator[int]:
    """Hold one of ``num_devices`` device slots (waiting until one is free); yield its index."""
    if num_devices < 1:
        raise ValueError(f"num_devices={num_devices} is not allowed: it must be >= 1")
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        for index in range(num_devices):
            handle = open(lock_dir / f"device{index}.lock", "a+")  # noqa: SIM115 (held while yielding)
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
