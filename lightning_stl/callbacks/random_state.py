"""The random state of a run, saved in its checkpoints and given back when it resumes."""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch

# Fabric's (private) helpers are the only ones that take torch's, CUDA's, numpy's and Python's
# RNGs together, as Lightning's own worker seeding does; writing them again would copy them
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states


class RandomStateCheckpoint(L.Callback):
    """Stores the global RNGs (torch CPU and CUDA, numpy, Python) in every checkpoint and, on
    resume, sets them back when training starts again (``on_train_start``).

    Lightning saves the loops, the optimiser, the schedulers and the callbacks' states, but not
    the RNGs (Fabric has the collect/set functions, used here, yet no callback calls them), so a
    resumed run augments, drops out and mixes with other random numbers than the killed run
    would have. With this, and the training streams of :mod:`lightning_stl.data.streams`, a
    resumed run repeats the uninterrupted one. The CUDA state saved is that of the run's own GPU,
    and it is put back into the GPU the resumed run trains on. Under DDP the checkpoint holds
    rank 0's states, which every process then starts from.
    """

    def __init__(self) -> None:
        self._to_restore: dict[str, Any] | None = None
        self._device: torch.device | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._device = trainer.strategy.root_device

    def state_dict(self) -> dict[str, Any]:
        states = _collect_rng_states(include_cuda=False)
        # the run's own GPU only: a resumed run may get another GPU of the pool, or see fewer
        if self._device is not None and self._device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self._device)
        kind, keys, position, has_gauss, gauss = states["numpy"]
        # plain tensors and numbers: checkpoints are read with weights_only=True
        states["numpy"] = [
            kind,
            torch.from_numpy(keys.astype(np.int64)),
            position,
            has_gauss,
            gauss,
        ]
        version, python_state, python_gauss = states["python"]
        states["python"] = [version, list(python_state), python_gauss]
        return states

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = dict(state_dict)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._to_restore is None:
            return
        states, self._to_restore = self._to_restore, None
        kind, keys, position, has_gauss, gauss = states["numpy"]
        states["numpy"] = (kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss)
        cuda = states.pop("cuda", None)
        states.pop("torch.cuda", None)
        _set_rng_states(states)
        device = trainer.strategy.root_device
        if cuda is not None and device.type == "cuda":
            torch.cuda.set_rng_state(cuda, device)
