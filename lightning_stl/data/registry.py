"""Data sets by name: where each is loaded from, its held-out validation size and augmentation.

A target set's official training split is divided into a training pool and a validation set of
``val_size`` images with a fixed seed (Smooth Transfer Learning, Appendix A.1–A.2: CIFAR-10 45,000
/ 5,000; SVHN 65,931 / 7,326). A source set is used whole. The fine-grained targets of SMILE
(:mod:`lightning_stl.data.fine_grained`) hold nothing out (``val_size=0``): SMILE trains on all
the drawn images and reports the final model, choosing hyper-parameters by cross-validation.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lightning_stl.data.augment import BatchAugment
from lightning_stl.data.file_image_set import FileImageSet
from lightning_stl.data.image_set import ImageSet
from lightning_stl.errors import parameters_of

Splits = dict[str, ImageSet | FileImageSet]


@dataclass(frozen=True)
class DatasetSpec:
    """How to load one data set and how to treat it as a target."""

    loader: str
    """``"module:function"`` with signature ``(root, download, **options) -> {"train", "test"}``
    (each an in-memory :class:`ImageSet` or a file-based :class:`FileImageSet`)."""
    num_classes: int
    val_size: int
    """Images of the official training split held out for validation when used as a target."""
    train_size: int | None
    """Size of the official training split (``None`` when it depends on options)."""
    augment: BatchAugment = field(default_factory=BatchAugment)
    files: str = ""
    """What is on disk, for documentation."""
    cache: bool = False
    """(In-memory sets only.) Keep the decoded tensors under ``<root>/.tensor_cache`` so that later runs memory-map them
    instead of decoding the original files again (CIFAR pickles, SVHN .mat, resized MNIST)."""

    def load(self, root: str | Path, download: bool, **options: Any) -> Splits:
        """The official splits; from the tensor cache when there is one."""
        cache_file = self._cache_file(root, options) if self.cache else None
        if cache_file is not None and cache_file.exists():
            try:
                return _read_cache(cache_file)
            except Exception:  # a damaged cache is made again
                cache_file.unlink(missing_ok=True)
        module, function = self.loader.split(":")
        load: Callable[..., Splits] = getattr(importlib.import_module(module), function)
        accepted = parameters_of(load)
        takes_any = any(
            p.kind is p.VAR_KEYWORD for p in inspect.signature(load).parameters.values()
        )
        unknown = [] if takes_any else sorted(set(options) - set(accepted))
        if unknown:
            own = [p for p in accepted if p not in ("root", "download")]
            raise ValueError(
                f"{unknown[0]} is not an option of the data set '{function.removeprefix('load_')}' (set in "
                f"data.source_options or data.target_options, which belong to the data set "
                f"chosen before); its options: {', '.join(own) or 'none'}"
            )
        splits = load(root, download=download, **options)
        if cache_file is not None:
            try:
                _write_cache(cache_file, splits)
            except OSError as error:  # a read-only data.root: decode again next time
                warnings.warn(
                    f"could not write the tensor cache {cache_file}: {error}", stacklevel=2
                )
        return splits

    def _cache_file(self, root: str | Path, options: dict[str, Any]) -> Path:
        key = json.dumps({"loader": self.loader, "options": options}, sort_keys=True, default=str)
        digest = hashlib.sha1(key.encode()).hexdigest()[:12]
        name = self.loader.rsplit(":", 1)[1]
        return Path(root) / ".tensor_cache" / f"{name}_{digest}.pt"


def _write_cache(path: Path, splits: dict[str, ImageSet]) -> None:
    """Save ``splits`` atomically (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        split: {
            "images": data.images.contiguous(),
            "labels": data.labels,
            "num_classes": data.num_classes,
            "max_value": data.max_value,
        }
        for split, data in splits.items()
    }
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _read_cache(path: Path) -> dict[str, ImageSet]:
    payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return {
        split: ImageSet(p["images"], p["labels"], int(p["num_classes"]), float(p["max_value"]))
        for split, p in payload.items()
    }


def _tensor_set(
    name: str, num_classes: int, val_size: int, train_size: int, files: str, flip: bool = False
) -> DatasetSpec:
    """The torchvision set ``name`` (``load_<name>`` of :mod:`lightning_stl.data.torchvision_sets`),
    decoded once into the tensor cache; ``flip``: CIFAR's augmentation (pad-and-crop by 4 pixels
    and horizontal flips, Smooth Transfer Learning Appendix A.1), else none."""
    return DatasetSpec(
        f"lightning_stl.data.torchvision_sets:load_{name}",
        num_classes=num_classes,
        val_size=val_size,
        train_size=train_size,
        augment=BatchAugment(crop_padding=4, horizontal_flip=True) if flip else BatchAugment(),
        files=files,
        cache=True,
    )


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
    "mnist": _tensor_set("mnist", 10, 6000, 60000, "<root>/MNIST/raw/*-ubyte"),
    "svhn": _tensor_set("svhn", 10, 7326, 73257, "<root>/train_32x32.mat, <root>/test_32x32.mat"),
    "cifar10": _tensor_set("cifar10", 10, 5000, 50000, "<root>/cifar-10-batches-py", flip=True),
    "cifar100": _tensor_set("cifar100", 100, 5000, 50000, "<root>/cifar-100-python", flip=True),
    # The fine-grained targets of SMILE (Section 4.0.1), read from files per batch.
    "cub200": DatasetSpec(
        "lightning_stl.data.fine_grained:load_cub200",
        num_classes=200,
        val_size=0,
        train_size=5994,
        files="<root>/CUB_200_2011/{images.txt, image_class_labels.txt, train_test_split.txt, "
        "classes.txt, images/}",
    ),
    "stanford_cars": DatasetSpec(
        "lightning_stl.data.fine_grained:load_stanford_cars",
        num_classes=196,
        val_size=0,
        train_size=8144,
        files="<root>/stanford_cars/{devkit/cars_meta.mat, devkit/cars_train_annos.mat, "
        "cars_test_annos_withlabels.mat, cars_train/, cars_test/}",
    ),
    "fgvc_aircraft": DatasetSpec(
        "lightning_stl.data.fine_grained:load_fgvc_aircraft",
        num_classes=100,
        val_size=0,
        train_size=6667,
        files="<root>/fgvc-aircraft-2013b/data/{variants.txt, images_variant_trainval.txt, "
        "images_variant_test.txt, images/}",
    ),
    "mit_indoor67": DatasetSpec(
        "lightning_stl.data.fine_grained:load_mit_indoor67",
        num_classes=67,
        val_size=0,
        train_size=5360,
        files="<root>/mit_indoor67/{TrainImages.txt, TestImages.txt, Images/<class>/}",
    ),
    "food101": DatasetSpec(
        "lightning_stl.data.fine_grained:load_food101",
        num_classes=101,
        val_size=0,
        train_size=75750,
        files="<root>/food-101/{meta/train.json, meta/test.json, images/<class>/}",
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
