"""The labels of an image set: the one check that in-memory and file-based sets share."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_labels"]


def check_labels(labels: Tensor, count: int, num_classes: int) -> None:
    """Raise ``ValueError`` unless ``labels`` is an int64 tensor ``[count]`` of values in
    ``[0, num_classes)``."""
    if labels.ndim != 1 or labels.shape[0] != count:
        raise ValueError(f"labels must have shape [{count}], got {tuple(labels.shape)}")
    if labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64, got {labels.dtype}")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]"
        )
