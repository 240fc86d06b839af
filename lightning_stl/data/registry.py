"""Data sets by name: where each is loaded from, its held-out validation size and augmentation.

A target set's official training split is divided into a training pool and a validation set of
``val_size`` images with a fixed seed (Smooth Transfer Learning, Appendix A.1–A.2: CIFAR-10 45,000
/ 5,000; SVHN 65,931 / 7,326). A source set is used whole.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_stl.data.augment import BatchAugment
from lightning_stl.data.image_set import ImageSet


@dataclass(frozen=True)
class DatasetSpec:
    """How to load one data set and how to treat it as a target."""

    loader: str
    """``"module:function"`` with signature ``(root, download, **options) -> {"train", "test"}``."""
    num_classes: int
    val_size: int
    """Images of the official training split held out for validation when used as a target."""
    train_size: int | None
    """Size of the official training split (``None`` when it depends on options)."""
    augment: BatchAugment = field(default_factory=BatchAugment)
    files: str = ""
    """What is on disk, for documentation."""

    def load(self, root: str | Path, download: bool, **options: Any) -> dict[str, ImageSet]:
        module, function = self.loader.split(":")
        load: Callable[..., dict[str, ImageSet]] = getattr(
            importlib.import_module(module), function
        )
        return load(root, download=download, **options)


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(
        "lightning_stl.data.uci_digits:load_uci_digits",
        num_classes=10,
        val_size=300,
        train_size=1297,
        files="embedded in scikit-learn (1,797 UCI optdigits, 500 held out for test)",
    ),
    "rendered_digits": DatasetSpec(
        "lightning_stl.data.rendered_digits:load_rendered_digits",
        num_classes=10,
        val_size=1000,
        train_size=None,
        files="rendered from matplotlib's fonts, cached under <root>/rendered_digits",
    ),
    "mnist": DatasetSpec(
        "lightning_stl.data.torchvision_sets:load_mnist",
        num_classes=10,
        val_size=6000,
        train_size=60000,
        files="<root>/MNIST/raw/*-ubyte",
    ),
    "svhn": DatasetSpec(
        "lightning_stl.data.torchvision_sets:load_svhn",
        num_classes=10,
        val_size=7326,
        train_size=73257,
        files="<root>/train_32x32.mat, <root>/test_32x32.mat",
    ),
    "cifar10": DatasetSpec(
        "lightning_stl.data.torchvision_sets:load_cifar10",
        num_classes=10,
        val_size=5000,
        train_size=50000,
        augment=BatchAugment(crop_padding=4, horizontal_flip=True),
        files="<root>/cifar-10-batches-py",
    ),
    "cifar100": DatasetSpec(
        "lightning_stl.data.torchvision_sets:load_cifar100",
        num_classes=100,
        val_size=5000,
        train_size=50000,
        augment=BatchAugment(crop_padding=4, horizontal_flip=True),
        files="<root>/cifar-100-python",
    ),
}


def get_dataset(name: str) -> DatasetSpec:
    """The :class:`DatasetSpec` called ``name``; a clear error listing the names otherwise."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(
            f"unknown data set {name!r}; known data sets: {', '.join(sorted(DATASETS))}"
        ) from None
