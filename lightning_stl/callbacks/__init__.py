"""Callbacks that act on training time (the λ(t) scheduler lives in :mod:`lightning_stl.schedule`)."""

from lightning_stl.callbacks.divergence import DivergenceGuard
from lightning_stl.callbacks.mean_teacher import MeanTeacherUpdate
from lightning_stl.callbacks.random_state import RandomStateCheckpoint
from lightning_stl.callbacks.regsl_projection import RegSLProjection
from lightning_stl.callbacks.resume_checkpoint import ResumeCheckpoint
from lightning_stl.callbacks.rifle import RIFLE
from lightning_stl.callbacks.run_step import RunStep

__all__ = [
    "RIFLE",
    "DivergenceGuard",
    "MeanTeacherUpdate",
    "RandomStateCheckpoint",
    "RegSLProjection",
    "ResumeCheckpoint",
    "RunStep",
]
