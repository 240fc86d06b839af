"""Augmentation and normalisation of whole batches on the training device.

Data sets stay in memory as uint8 tensors (:class:`~lightning_stl.data.image_set.ImageSet`), and
each batch is converted, augmented and normalised at once after it reaches the device, instead of
per sample in PIL: pad-and-random-crop and horizontal flip for CIFAR (Smooth Transfer Learning
Appendix A.1 follows ResNet's CIFAR recipe), no flip for digits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_stl.checks import flag


@dataclass(frozen=True)
class BatchAugment:
    """Random crop of the zero-padded image and random horizontal flip, per sample of a batch."""

    crop_padding: int = 0
    horizontal_flip: bool = False

    def __post_init__(self) -> None:
        if (
            isinstance(self.crop_padding, bool)
            or not isinstance(self.crop_padding, int)
            or self.crop_padding < 0
        ):
            raise ValueError(
                f"crop_padding={self.crop_padding!r} is not allowed: it must be an integer >= 0"
            )
        flag("horizontal_flip", self.horizontal_flip)

    @property
    def is_identity(self) -> bool:
        return self.crop_padding == 0 and not self.horizontal_flip

    def __call__(self, x: Tensor) -> Tensor:
        """Augment ``x`` ``[B, C, H, W]`` (float) with the global torch RNG of its device."""
        if self.crop_padding:
            x = random_crop(x, self.crop_padding)
        if self.horizontal_flip:
            x = random_horizontal_flip(x)
        return x


def as_augment(
    value: BatchAugment | dict[str, Any] | None, default: BatchAugment, name: str
) -> BatchAugment:
    """``data.<name>``: null (the data set's default), a BatchAugment, or its settings."""
    if value is None:
        return default
    if isinstance(value, BatchAugment):
        return value
    settings = ", ".join(f.name for f in dataclasses.fields(BatchAugment))
    if not isinstance(value, dict):
        raise ValueError(
            f"data.{name}={value!r} is not allowed: it must be null (the data set's default) or "
            f"settings of the batch augmentation: {settings}"
        )
    unknown = sorted(set(value) - {f.name for f in dataclasses.fields(BatchAugment)})
    if unknown:
        raise ValueError(
            f"data.{name}.{unknown[0]} is not a setting of the batch augmentation; its "
            f"settings: {settings}"
        )
    return BatchAugment(**value)


def random_crop(x: Tensor, padding: int) -> Tensor:
    """Zero-pad ``x`` ``[B, C, H, W]`` by ``padding`` and crop an H x W window at a random offset per sample."""
    b, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (b,), device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (b,), device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channels = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, channels, rows, cols]


def random_horizontal_flip(x: Tensor) -> Tensor:
    """Flip each image of ``x`` ``[B, C, H, W]`` left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


class Normalize:
    """uint8 ``[B, C, H, W]`` → float, scaled by ``max_value`` to [0, 1], then standardised per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], max_value: float):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.max_value = float(max_value)

    def scale(self, x: Tensor) -> Tensor:
        """uint8 → float in [0, 1]."""
        return x.to(torch.float32) / self.max_value

    def standardize(self, x: Tensor) -> Tensor:
        """Subtract the channel mean and divide by the channel standard deviation."""
        if self.mean.device != x.device:
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        return (x - self.mean) / self.std
