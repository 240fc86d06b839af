"""RIFLE: re-initialise the new target head a few times during fine-tuning.

Li, Xiong, An, Xu, Dou, "RIFLE: Backpropagation in Depth for Deep Transfer Learning through
Re-Initializing the Fully-connected LayEr", ICML 2020 (arXiv:2007.03349). Fine-tuning from a
pre-trained model moves the deep (early) layers little, because the backpropagated signal is
small once the new head fits the training set; RIFLE re-draws the head at random "periodically"
so that the loss, and with it the gradient reaching the backbone, becomes large again.

The schedule (:func:`rifle_steps`): ``times`` re-initialisations divide a run of T optimiser steps
into ``times + 1`` equal periods, the head being re-drawn after steps

    s_k = ⌊k · T / (times + 1)⌋,    k = 1, ..., times,

as both official codes do (PyTorch, github.com/lixingjian/RIFLE: ``fc_reinit_times`` re-inits at
the end of every ``epochs // (fc_reinit_times + 1)`` epochs; PaddlePaddle,
github.com/haozhe-an/RIFLE-Paddle-Implementation: ``cyclic_num`` periods, e.g. re-inits after
epochs 10, 20, 30 of 40). A re-initialisation that would leave less than the last stretch of
training (``last_fraction`` of the steps, at least one step) for the head to converge again is
dropped: s_k is kept only when ``T − s_k ≥ ⌈last_fraction · T⌉``. The Paddle code skips any
re-init in its last 5 of 40 epochs, hence the default ``last_fraction = 0.125``; with the default
``times = 3`` (re-inits at T/4, T/2, 3T/4) nothing is dropped.

Differences from the official codes, on purpose: the re-initialisation is
``nn.Linear.reset_parameters`` (PyTorch's default draw; the PyTorch code does the same, the
Paddle code draws N(0, 2/fan)), and the optimiser's state of the head (SGD's momentum buffer) is
cleared, so the new head does not move along the old head's momentum (``reset_momentum``; the
official codes keep it). Neither code's optional cyclic learning rate for the head is included:
the head follows the run's schedule.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_stl.checks import integer, number

log = logging.getLogger(__name__)


def rifle_steps(total_steps: int, times: int, last_fraction: float = 0.125) -> list[int]:
    """The optimiser steps after which RIFLE re-initialises the head, in increasing order.

    ``s_k = ⌊k · T / (times + 1)⌋`` for k = 1..times (T = ``total_steps``), keeping the s_k with
    ``1 <= s_k`` and ``T − s_k >= ⌈last_fraction · T⌉`` (at least the last stretch remains to train
    the new head); duplicates (T < times + 1) are merged. A step s means "after the s-th optimiser
    step, before the (s + 1)-th".
    """
    integer("RIFLE total_steps", total_steps, low=1)
    times = integer("RIFLE times", times, low=0)
    last_fraction = number("RIFLE last_fraction", last_fraction, at_least=0, below=1)
    last_stretch = math.ceil(last_fraction * total_steps)
    steps = {k * total_steps // (times + 1) for k in range(1, times + 1)}
    return sorted(s for s in steps if s >= 1 and total_steps - s >= last_stretch)


def _submodule(module: nn.Module, path: str) -> nn.Module:
    target: Any = module
    for name in path.split("."):
        target = getattr(target, name, None)
    if not isinstance(target, nn.Module) or not hasattr(target, "reset_parameters"):
        raise ValueError(
            f"RIFLE head={path!r}: {type(module).__name__} has no module {path!r} with "
            "reset_parameters() (FineTune's new target head is 'head')"
        )
    return target


class RIFLE(Callback):
    """Re-initialise the target head after the optimiser steps of :func:`rifle_steps`.

    The total T is ``trainer.estimated_stepping_batches`` (optimiser steps: ``max_steps``, or the
    epochs' batches divided by the gradient accumulation). A re-initialisation happens at the start
    of the first batch after its step, i.e. once per optimiser step whatever the accumulation, and
    before that batch's forward. The steps already done are the callback's ``state_dict``, saved
    in checkpoints: a resumed run neither repeats nor skips one (a re-init whose step the
    checkpoint had reached without doing it is done at the first batch of the resumed run).

    Args:
        times: Number of re-initialisations (≥ 0; 0 is plain fine-tuning). Default 3, the
            paper's re-inits after epochs 10, 20 and 30 of 40.
        last_fraction: Share of the steps at the end of training left without re-initialisation,
            in [0, 1). Default 0.125: the Paddle code's last 5 of 40 epochs.
        reset_momentum: Clear the optimiser state (momentum) of the head's parameters too.
        head: Attribute path of the head in the LightningModule (``head`` for FineTune).
    """

    def __init__(
        self,
        times: int = 3,
        last_fraction: float = 0.125,
        reset_momentum: bool = True,
        head: str = "head",
    ):
        self.times = integer("RIFLE times", times, low=0)
        self.last_fraction = number(
            "RIFLE last_fraction",
            last_fraction,
            at_least=0,
            below=1,
            what="the untouched end share",
        )
        self.reset_momentum = bool(reset_momentum)
        self.head = str(head)
        self.schedule: list[int] = []
        self.done: list[int] = []

    # ------------------------------------------------------------------ state (resume)
    def state_dict(self) -> dict[str, Any]:
        return {"schedule": list(self.schedule), "done": list(self.done)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.done = [int(s) for s in state_dict.get("done", [])]

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # a new fit starts with nothing done; a resumed one then loads its state (Lightning
        # restores callbacks after setup)
        if stage == "fit":
            _submodule(pl_module, self.head)
            self.done = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = int(trainer.estimated_stepping_batches)
        self.schedule = rifle_steps(total, self.times, self.last_fraction)
        if len(self.schedule) < self.times:
            log.warning(
                "RIFLE: %d of times=%d re-initialisations fit in %d steps outside the last "
                "stretch (last_fraction=%g); doing them after steps %s",
                len(self.schedule),
                self.times,
                total,
                self.last_fraction,
                self.schedule,
            )

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step  # optimiser steps completed so far
        due = [s for s in self.schedule if s <= step and s not in self.done]
        if due:
            self.reinitialise(trainer, pl_module)
            self.done.extend(due)

    # ------------------------------------------------------------------ the re-initialisation
    def reinitialise(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Draw the head afresh and (with ``reset_momentum``) forget its optimiser state."""
        head = _submodule(pl_module, self.head)
        head.reset_parameters()
        if self.reset_momentum:
            clear_optimizer_state(trainer.optimizers, list(head.parameters()))
        log.info("RIFLE: re-initialised %s after step %d", self.head, trainer.global_step)


def clear_optimizer_state(optimizers: Sequence[Any], parameters: Sequence[nn.Parameter]) -> None:
    """Remove the per-parameter state (e.g. SGD's ``momentum_buffer``) of ``parameters``."""
    for optimizer in optimizers:
        for parameter in parameters:
            optimizer.state.pop(parameter, None)
