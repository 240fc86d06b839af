"""Image sets read from files, decoded and transformed per sample in DataLoader workers.

The fine-grained targets of SMILE (CUB-200-2011, Stanford Cars, FGVC-Aircraft, MIT Indoor-67,
Food-101) are too large and too varied in image size to hold in memory like the digit and CIFAR
sets of :mod:`lightning_stl.data.image_set`. A :class:`FileImageSet` keeps their file paths and
labels; a :class:`FileImageDataset` decodes each image with PIL and applies the transforms of
SMILE, Section 4.0.2 (:func:`smile_transform`), in the DataLoader's worker processes, so batches
arrive as normalised float tensors ``[B, 3, crop, crop]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms as T

from lightning_stl.checks import flag, integer
from lightning_stl.data.labels import check_labels
from lightning_stl.data.protocols import class_selection

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "FileImageDataset",
    "FileImageSet",
    "smile_transform",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True, eq=False)
class FileImageSet:
    """Image files ``root / files[i]`` with labels ``[N]`` (int64) and class names.

    ``files`` is a NumPy string array rather than a list of ``str`` so that forked DataLoader
    workers do not copy it page by page as they touch the Python objects' reference counts.
    """

    root: Path
    files: np.ndarray
    labels: Tensor
    num_classes: int
    classes: tuple[str, ...] = field(default=())
    """Class names in label order (empty when unknown)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        object.__setattr__(self, "files", np.asarray(self.files, dtype=str).reshape(-1))
        object.__setattr__(self, "classes", tuple(self.classes))
        check_labels(self.labels, len(self.files), self.num_classes)
        if self.classes and len(self.classes) != self.num_classes:
            raise ValueError(
                f"{len(self.classes)} class names given for num_classes={self.num_classes}"
            )

    @classmethod
    def from_paths(
        cls, root: str | Path, files: Sequence[str], labels: Sequence[int], classes: Sequence[str]
    ) -> FileImageSet:
        """A set of ``len(classes)`` classes from file paths relative to ``root`` and labels."""
        return cls(
            Path(root),
            np.asarray(list(files), dtype=str),
            torch.as_tensor(np.asarray(labels, dtype=np.int64).reshape(-1)),
            len(classes),
            tuple(classes),
        )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def path(self, index: int) -> Path:
        """The file of image ``index``."""
        return self.root / str(self.files[index])

    def subset(self, indices: Tensor | np.ndarray) -> FileImageSet:
        """The images at ``indices``, in that order (classes unchanged)."""
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        return FileImageSet(
            self.root, self.files[index], self.labels[torch.from_numpy(index)].clone(),
            self.num_classes, self.classes,
        )  # fmt: skip

    def select_classes(self, class_ids: Sequence[int] | np.ndarray) -> FileImageSet:
        """Only the images of ``class_ids``, relabelled by position in it (0..len-1)."""
        indices, labels = class_selection(self.labels.numpy(), class_ids)
        names = tuple(self.classes[int(c)] for c in class_ids) if self.classes else ()
        return FileImageSet(
            self.root, self.files[indices], torch.from_numpy(labels), len(class_ids), names
        )


def smile_transform(
    train: bool, resize_size: int = 256, crop_size: int = 224, keep_aspect: bool = False
) -> T.Compose:
    """The per-image transform of SMILE, Section 4.0.2.

    Training: ``Resize((resize, resize))`` → ``RandomCrop(crop)`` → ``RandomHorizontalFlip`` →
    ``ToTensor`` → ``Normalize`` (ImageNet mean and std). Evaluation: ``Resize((resize,
    resize))`` → ``CenterCrop(crop)`` → ``ToTensor`` → ``Normalize``. The output is a float
    tensor ``[3, crop, crop]``.

    ``keep_aspect`` (the authors' code, ``utils.py`` ``transform_train``/``transform_test`` with
    ``keep_aspect=true`` in ``task_config.ini``, set there for CUB-200-2011): ``Resize(resize)``
    scales the shorter side to ``resize`` and keeps the aspect ratio, so the 224 x 224 crop
    (random in training, central in evaluation) sees less of the longer side. The paper's text
    says 256 x 256 for every data set.
    """
    for name, value in (("resize_size", resize_size), ("crop_size", crop_size)):
        integer(f"data.{name}", value, low=1)
    if crop_size > resize_size:
        raise ValueError(
            f"data.crop_size={crop_size} exceeds data.resize_size={resize_size}; allowed: "
            f"crop_size <= resize_size"
        )
    crop: list[Callable] = (
        [T.RandomCrop(crop_size), T.RandomHorizontalFlip()] if train else [T.CenterCrop(crop_size)]
    )
    flag("data.keep_aspect", keep_aspect)
    return T.Compose(
        [
            T.Resize(resize_size if keep_aspect else (resize_size, resize_size)),
            *crop,
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class FileImageDataset(Dataset):
    """``(transform(RGB image), label)`` for each image of a :class:`FileImageSet`."""

    def __init__(self, data: FileImageSet, transform: Callable[[Image.Image], Tensor]):
        self.data = data
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, int]:
        """Image ``key``, or ``(index, seed)``: its random transform drawn from ``seed`` (see
        :class:`~lightning_stl.data.streams.EpochPermutationSampler`), leaving the process's RNG
        as it was."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        with Image.open(self.data.path(index)) as image:
            rgb = image.convert("RGB")
        if seed is None:
            return self.transform(rgb), int(self.data.labels[index])
        # only the CPU generator, which torchvision's random transforms draw from
        # (torch.manual_seed would also seed every device's, 100x slower)
        state = torch.get_rng_state()
        torch.default_generator.manual_seed(seed)
        try:
            return self.transform(rgb), int(self.data.labels[index])
        finally:
            torch.set_rng_state(state)
