"""Silence what is noise for this project's users in Lightning's and torch's console output.

A run builds one ``Trainer`` per stage plus one to test, and each prints Lightning's adverts
("💡 Tip: ... litlogger / litmodels") and the GPU/TPU banner; torch warns that Lightning uses the
deprecated ``LeafSpec``; and two warnings describe choices this project makes on purpose: the
log interval longer than a tiny epoch (small N, steps are logged by ``log_every_n_steps``), and
SMILE's mean teacher, frozen in eval mode. Neither library offers a switch for these (they are
``rank_zero_info`` lines and ``warnings.warn`` calls), so a logging filter and warning filters
drop them; the banner and the fast mode's "Using bfloat16 Automatic Mixed Precision" are kept
once per process. Everything else Lightning says is kept.
"""

from __future__ import annotations

import logging
import warnings

#: Messages that say nothing to a user of this project (regular expressions for ``warnings``).
IGNORED_WARNINGS = (
    r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*",
    r"The number of training batches \(\d+\) is smaller than the logging interval.*",
    r"Found \d+ module\(s\) in eval mode at the start of training.*",
)
_RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"


class _LightningNoise(logging.Filter):
    """Drops Lightning's "💡 Tip" adverts and repeats of the GPU/TPU banner."""

    def __init__(self) -> None:
        super().__init__()
        self.seen_banners: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("💡 Tip"):
            return False
        if message.startswith("`Trainer(val_check_interval=1)` was configured"):
            return False  # a short run (run_fraction) of an epoch-per-step stage
        if message.startswith(
            ("GPU available", "TPU available", "HPU available", "Using bfloat16")
        ):
            if message in self.seen_banners:
                return False
            self.seen_banners.add(message)
        return True


def quiet_library_noise() -> None:
    """Install the filters (once per process; calling again changes nothing)."""
    for pattern in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    logger = logging.getLogger(_RANK_ZERO_LOGGER)
    if not any(isinstance(f, _LightningNoise) for f in logger.filters):
        logger.addFilter(_LightningNoise())
