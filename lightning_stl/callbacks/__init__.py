"""Callbacks that act on training time (the λ(t) scheduler lives in :mod:`lightning_stl.schedule`)."""

from lightning_stl.callbacks.divergence import DivergenceGuard
from lightning_stl.callbacks.mean_teacher import MeanTeacherUpdate

__all__ = ["DivergenceGuard", "MeanTeacherUpdate"]
