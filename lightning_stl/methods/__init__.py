"""LightningModules, one per method family."""

from lightning_stl.methods.finetune import FineTune
from lightning_stl.methods.smooth_transfer import SmoothTransfer, smooth_transfer_loss

__all__ = ["FineTune", "SmoothTransfer", "smooth_transfer_loss"]
