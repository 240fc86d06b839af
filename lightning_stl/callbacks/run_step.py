"""The run's step (counted over all stages) as a logged value, for checkpoint names."""

from __future__ import annotations

import lightning as L


class RunStep(L.Callback):
    """Logs ``run_step`` = ``offset`` + the stage's ``global_step`` at every validation.

    A method of several stages (``finetune``: source, then target) restarts Lightning's step
    count in each; ``metrics.json``, ``target_weight.png`` and the learning curve count the steps
    of the whole run. With ``filename: best-step{run_step:.0f}`` the best checkpoint is named by
    that step too (``best-step2411.ckpt``, not the stage's ``best-step41.ckpt``).
    """

    def __init__(self, offset: int = 0):
        self.offset = int(offset)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            pl_module.log("run_step", float(self.offset + trainer.global_step), on_epoch=True)
