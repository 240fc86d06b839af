"""In-memory image sets: one uint8 tensor of images and one int64 tensor of labels.

Every data set of this project (the embedded digits, the rendered source digits, MNIST, SVHN,
CIFAR-10/100) fits in memory, so it is loaded once into an :class:`ImageSet` and batches are
gathered from it by index. Conversion to float, normalisation and augmentation happen on whole
batches on the training device (see :mod:`lightning_stl.data.augment`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lightning_stl.data.labels import check_labels
from lightning_stl.data.protocols import class_selection


@dataclass(frozen=True)
class ImageSet:
    """Images ``[N, C, H, W]`` (uint8) with labels ``[N]`` (int64) and their value range.

    ``max_value`` is the pixel value that maps to 1.0: 255 for ordinary images, 16 for the UCI
    optdigits images whose pixels count on-bits in 4x4 blocks.
    """

    images: Tensor
    labels: Tensor
    num_classes: int
    max_value: float = 255.0

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"images must have shape [N, C, H, W], got {tuple(self.images.shape)}")
        if self.images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8, got {self.images.dtype}")
        check_labels(self.labels, self.images.shape[0], self.num_classes)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, indices: Tensor | np.ndarray) -> ImageSet:
        """The images at ``indices`` (a copy), in that order."""
        index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return ImageSet(
            self.images[index].contiguous(),
            self.labels[index].contiguous(),
            self.num_classes,
            self.max_value,
        )

    def select_classes(self, class_ids: Sequence[int] | np.ndarray) -> ImageSet:
        """Only the images of ``class_ids`` (a copy), relabelled by position in it (0..len-1)."""
        indices, labels = class_selection(self.labels.numpy(), class_ids)
        index = torch.from_numpy(indices)
        return ImageSet(
            self.images[index].contiguous(),
            torch.from_numpy(labels),
            len(class_ids),
            self.max_value,
        )

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and standard deviation of the images scaled to [0, 1]."""
        x = self.images.to(torch.float64) / self.max_value
        mean = x.mean(dim=(0, 2, 3))
        std = x.std(dim=(0, 2, 3)).clamp_min(1e-6)
        return mean.tolist(), std.tolist()
