"""A CSV logger whose log survives a resume, and the rule for when per-step values are logged.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` whenever a new writer starts in a folder that
has one ("Previous log files in this directory will be deleted"), so a run killed and resumed
from its ``last.ckpt`` ends with the log of the resumed part only. Lightning has no option to
keep it, hence :class:`ResumableCSVLogger`: its writer keeps the file, and when the resumed fit
logs its first row at step s it drops the old rows of steps ≥ s (the part after the checkpoint,
which the resumed fit logs again), so every step appears once.
"""

from __future__ import annotations

import csv
import os
from typing import Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


# A subclass of Lightning's writer and logger: it uses their file system (_fs) and writer slot
# (_experiment), which Lightning's own subclasses use; no public hook keeps the old log.
class _KeepingWriter(ExperimentWriter):
    """``ExperimentWriter`` that appends to an existing ``metrics.csv`` (see the module)."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        self._resuming = self._fs.isfile(self.metrics_file_path)

    def _check_log_dir_exists(self) -> None:
        """Lightning's version deletes the old log here; this writer keeps it."""

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        if self._resuming:  # the resumed fit's first row: the old log is cut before its step
            self._resuming = False
            self._keep_rows_before(step if step is not None else 0)
        super().log_metrics(metrics_dict, step)

    def _keep_rows_before(self, first: int) -> None:
        with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
            reader = csv.DictReader(handle)
            keys = list(reader.fieldnames or [])
            rows = [r for r in reader if r.get("step") and int(r["step"]) < first]
        self.metrics_keys = sorted(keys)
        temporary = f"{self.metrics_file_path}.{os.getpid()}.tmp"
        with self._fs.open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)
        self._fs.mv(temporary, self.metrics_file_path)  # the old log is never half-written


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` that keeps an interrupted fit's rows when the fit is resumed."""

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment


def logs_this_step(trainer: L.Trainer) -> bool:
    """Whether the loggers write the step about to run: every ``trainer.log_every_n_steps``
    optimiser steps (Lightning's rule; its own check, ``_logger_connector.should_update_logs``, is
    private). Lightning drops the other steps' values only after each ``LightningModule.log``
    call has done its work, about a millisecond on a CPU (``benchmarks/training_step.py``, two
    runs each: ratio 1.052 and 1.124 logging every step, 1.058 and 1.047 with this check; noisy,
    about 3% on average), so per-step values are logged only on these steps."""
    return (trainer.global_step + 1) % max(1, trainer.log_every_n_steps) == 0
