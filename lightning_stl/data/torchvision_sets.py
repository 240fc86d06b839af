"""MNIST, SVHN, CIFAR-10 and CIFAR-100 loaded through torchvision into in-memory :class:`ImageSet`.

These are the image pairs of the Smooth Transfer Learning experiments (Appendix A.1-A.2):

* **CIFAR-10 target / CIFAR-100 source** (:func:`load_cifar10`, :func:`load_cifar100`);
* **SVHN target / MNIST source** (:func:`load_svhn`, :func:`load_mnist`). MNIST is resized to
  32x32 and given 3 channels so that it has SVHN's image shape and can feed the same 3-channel
  WideResNet.

Every loader has the signature ``load_X(root, download=False, **options)`` and returns the
official splits ``{"train": ImageSet, "test": ImageSet}``. ``root`` is handed to torchvision as
its ``root``, so the files are where torchvision (0.19 to 0.29) looks for them:

============  ==============================================================================
MNIST         ``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (unzipped)
SVHN          ``<root>/train_32x32.mat``, ``<root>/test_32x32.mat``
CIFAR-10      ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``
CIFAR-100     ``<root>/cifar-100-python/{train,test,meta}``
============  ==============================================================================

SVHN and CIFAR files must also have the official MD5 sums (torchvision checks them). With
``download=True`` torchvision fetches what is missing (this is what a DataModule's
``prepare_data`` calls); an official archive that is already in place (for example
``<root>/cifar-10-python.tar.gz`` or ``<root>/MNIST/raw/*.gz``) is extracted instead of being
downloaded. With ``download=False`` nothing touches the network.

Data that is absent (or fails torchvision's check) with ``download=False``, or a download that
fails, raises :class:`~lightning_stl.data.errors.DatasetNotFoundError` naming the data set, the
folder, the expected files and, for a failed download, the reason; torchvision's own generic
``RuntimeError("Dataset not found or corrupted ...")`` never reaches the caller.

The arrays are read straight from the dataset objects' ``.data``/``.targets``/``.labels``, with
no per-sample PIL conversion.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.datasets import CIFAR10, CIFAR100, MNIST, SVHN
from torchvision.datasets.utils import check_integrity

from lightning_stl.checks import integer
from lightning_stl.data.errors import DatasetNotFoundError
from lightning_stl.data.image_set import ImageSet

__all__ = [
    "TORCHVISION_LOADERS",
    "load_cifar10",
    "load_cifar100",
    "load_mnist",
    "load_svhn",
]

Loader = Callable[..., dict[str, ImageSet]]

# Exceptions that a torchvision download can end in: URLError/HTTPError/timeouts/broken gzip
# files are OSError; torchvision reports a bad MD5 or all mirrors failing as RuntimeError.
_DOWNLOAD_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    RuntimeError,
    EOFError,
    tarfile.TarError,
)

# Images per resize chunk: 8192 MNIST images at 32x32 in float32 are 32 MB.
_RESIZE_CHUNK = 8192


# --------------------------------------------------------------------------------------------
# Expected files (taken from the torchvision classes so they follow torchvision)
# --------------------------------------------------------------------------------------------


def _mnist_files() -> list[tuple[str, str | None]]:
    """``(path relative to root, md5 or None)``; torchvision only checks the raw files exist."""
    raw = f"{MNIST.__name__}/raw"
    return [(f"{raw}/{os.path.splitext(name)[0]}", None) for name, _ in MNIST.resources]


def _svhn_files() -> list[tuple[str, str | None]]:
    return [(SVHN.split_list[split][1], SVHN.split_list[split][2]) for split in ("train", "test")]


def _cifar_files(cls: type[CIFAR10]) -> list[tuple[str, str | None]]:
    entries = [*cls.train_list, *cls.test_list, [cls.meta["filename"], cls.meta["md5"]]]
    return [(f"{cls.base_folder}/{name}", md5) for name, md5 in entries]


def _file_status(root: Path, files: list[tuple[str, str | None]]) -> list[str]:
    """The expected files, each marked when it is missing or fails torchvision's MD5 check.

    When every file is missing the names are given plainly (the message already says "not
    found"); when only some are, the faulty ones are marked so the user knows which to replace.
    """
    names = [name for name, _ in files]
    present = [(root / name).is_file() for name in names]
    if not any(present):
        return names
    described = []
    for (name, md5), exists in zip(files, present, strict=True):
        if not exists:
            described.append(f"{name} (missing)")
        elif not check_integrity(root / name, md5):
            described.append(f"{name} (present but its MD5 is not the official file's)")
        else:
            described.append(name)
    return described


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


@contextmanager
def _torchvision_errors(
    name: str, root: Path, files: list[tuple[str, str | None]], download: bool
) -> Iterator[None]:
    """Turn torchvision's "not found"/download failures into :class:`DatasetNotFoundError`."""
    try:
        yield
    except _DOWNLOAD_ERRORS as exc:
        names = [file for file, _ in files]
        if download:
            raise DatasetNotFoundError(name, root, names, reason=_one_line(exc)) from exc
        if not isinstance(exc, RuntimeError):
            raise
        status = _file_status(root, files)
        if status == names and all((root / file).is_file() for file in names):
            raise  # every file is in place and intact: the error is something else
        raise DatasetNotFoundError(name, root, status) from exc
    except DatasetNotFoundError:
        raise
    except Exception as exc:  # the files are there but do not decode (torchvision asserts)
        names = ", ".join(file for file, _ in files)
        raise ValueError(
            f"the files of data set '{name}' in {root} cannot be read ({type(exc).__name__}: "
            f"{_one_line(exc) or 'bad format'}): they are damaged or not the official files "
            f"({names}). Delete them and put the official files there (or set "
            "data.download=true)"
        ) from None


# --------------------------------------------------------------------------------------------
# Array conversion
# --------------------------------------------------------------------------------------------


def _resize_uint8(images: Tensor, size: int) -> Tensor:
    """Bilinear (antialiased) resize of uint8 ``[N, C, H, W]`` to ``size x size``, in chunks.

    Each chunk goes through float32 and back to uint8 with rounding, so a constant image stays
    exactly constant.
    """
    n, c = images.shape[:2]
    out = torch.empty((n, c, size, size), dtype=torch.uint8)
    for start in range(0, n, _RESIZE_CHUNK):
        chunk = images[start : start + _RESIZE_CHUNK].to(torch.float32)
        resized = F.interpolate(
            chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
        out[start : start + _RESIZE_CHUNK] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _labels(values: Any) -> Tensor:
    return torch.as_tensor(np.asarray(values), dtype=torch.int64).reshape(-1)


def _hwc_to_image_set(data: np.ndarray, labels: Any, num_classes: int) -> ImageSet:
    """``[N, H, W, C]`` uint8 array (CIFAR's ``.data``) to an :class:`ImageSet` ``[N, C, H, W]``."""
    images = torch.from_numpy(np.asarray(data, dtype=np.uint8)).permute(0, 3, 1, 2).contiguous()
    return ImageSet(images, _labels(labels), num_classes)


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


def load_mnist(
    root: str | Path,
    download: bool = False,
    image_size: int = 32,
    channels: int = 3,
) -> dict[str, ImageSet]:
    """MNIST (60,000 train / 10,000 test digits), the **source** of the SVHN/MNIST pair.

    Smooth Transfer Learning (Appendix A.2) feeds MNIST to the same 3-channel WideResNet as its
    SVHN target, so by default the 28x28 grey images are resized once here to 32x32 (bilinear
    with antialiasing on the whole uint8 tensor, in chunks, rounded back to uint8) and given 3
    identical channels by :meth:`torch.Tensor.expand` (a view, no copy).

    Args:
        root: torchvision root; the files are ``<root>/MNIST/raw/train-images-idx3-ubyte``,
            ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``.
        download: let torchvision download (and unzip) the files if they are missing.
        image_size: side of the square output images; 28 keeps the original pixels.
        channels: 1 (grey) or 3 (the grey channel repeated).

    Returns:
        ``{"train": ImageSet, "test": ImageSet}`` with images ``[N, channels, image_size,
        image_size]`` (uint8), labels 0..9 and ``num_classes=10``.

    Raises:
        DatasetNotFoundError: the files are missing with ``download=False``, or the download
            failed.
        ValueError: ``image_size`` is not positive or ``channels`` is not 1 or 3.
    """
    integer("mnist image_size", image_size, low=1)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    root = Path(root)
    splits: dict[str, ImageSet] = {}
    with _torchvision_errors("mnist", root, _mnist_files(), download):
        for split in ("train", "test"):
            dataset = MNIST(root, train=split == "train", download=download)
            images = torch.as_tensor(dataset.data, dtype=torch.uint8).unsqueeze(1)  # [N,1,28,28]
            if images.shape[-2:] != (image_size, image_size):
                images = _resize_uint8(images, image_size)
            if channels == 3:
                images = images.expand(-1, 3, -1, -1)
            splits[split] = ImageSet(images, _labels(dataset.targets), 10)
    return splits


def load_svhn(root: str | Path, download: bool = False) -> dict[str, ImageSet]:
    """SVHN cropped digits (73,257 train / 26,032 test, 32x32 RGB), the **target** of SVHN/MNIST.

    Smooth Transfer Learning (Appendix A.2) transfers from MNIST (see :func:`load_mnist`) to
    SVHN. The ``"extra"`` split is not used. The ``.mat`` files label the digit 0 as 10;
    torchvision maps it to 0, so the labels are 0..9.

    Args:
        root: torchvision root; the files are ``<root>/train_32x32.mat`` and
            ``<root>/test_32x32.mat`` (torchvision checks their MD5).
        download: let torchvision download the files if they are missing.

    Returns:
        ``{"train": ImageSet, "test": ImageSet}`` with images ``[N, 3, 32, 32]`` (uint8), labels
        0..9 and ``num_classes=10``.

    Raises:
        DatasetNotFoundError: the files are missing (or corrupt) with ``download=False``, or the
            download failed.
    """
    root = Path(root)
    splits: dict[str, ImageSet] = {}
    with _torchvision_errors("svhn", root, _svhn_files(), download):
        for split in ("train", "test"):
            dataset = SVHN(root, split=split, download=download)
            # ``.data`` is the .mat's X [H, W, C, N] transposed to [N, C, H, W] (a view).
            images = torch.from_numpy(np.ascontiguousarray(dataset.data, dtype=np.uint8))
            splits[split] = ImageSet(images, _labels(dataset.labels), 10)
    return splits


def _load_cifar(
    cls: type[CIFAR10], name: str, num_classes: int, root: str | Path, download: bool
) -> dict[str, ImageSet]:
    root = Path(root)
    splits: dict[str, ImageSet] = {}
    with _torchvision_errors(name, root, _cifar_files(cls), download):
        for split in ("train", "test"):
            dataset = cls(root, train=split == "train", download=download)
            splits[split] = _hwc_to_image_set(dataset.data, dataset.targets, num_classes)
    return splits


def load_cifar10(root: str | Path, download: bool = False) -> dict[str, ImageSet]:
    """CIFAR-10 (50,000 train / 10,000 test, 32x32 RGB, 10 classes), the **target** of its pair.

    Smooth Transfer Learning (Appendix A.1) transfers from CIFAR-100 (see
    :func:`load_cifar100`) to CIFAR-10.

    Args:
        root: torchvision root; the files are ``<root>/cifar-10-batches-py/data_batch_1`` ...
            ``data_batch_5``, ``test_batch`` and ``batches.meta`` (torchvision checks their MD5).
        download: let torchvision download and extract ``cifar-10-python.tar.gz`` if needed.

    Returns:
        ``{"train": ImageSet, "test": ImageSet}`` with images ``[N, 3, 32, 32]`` (uint8,
        contiguous), labels 0..9 and ``num_classes=10``.

    Raises:
        DatasetNotFoundError: the files are missing (or corrupt) with ``download=False``, or the
            download failed.
    """
    return _load_cifar(CIFAR10, "cifar10", 10, root, download)


def load_cifar100(root: str | Path, download: bool = False) -> dict[str, ImageSet]:
    """CIFAR-100 (50,000 train / 10,000 test, 32x32 RGB), the **source** of CIFAR-100/CIFAR-10.

    Smooth Transfer Learning (Appendix A.1) pre-trains on CIFAR-100 and transfers to CIFAR-10
    (see :func:`load_cifar10`). The labels are the 100 fine labels.

    Args:
        root: torchvision root; the files are ``<root>/cifar-100-python/train``, ``test`` and
            ``meta`` (torchvision checks their MD5).
        download: let torchvision download and extract ``cifar-100-python.tar.gz`` if needed.

    Returns:
        ``{"train": ImageSet, "test": ImageSet}`` with images ``[N, 3, 32, 32]`` (uint8,
        contiguous), fine labels 0..99 and ``num_classes=100``.

    Raises:
        DatasetNotFoundError: the files are missing (or corrupt) with ``download=False``, or the
            download failed.
    """
    return _load_cifar(CIFAR100, "cifar100", 100, root, download)


TORCHVISION_LOADERS: dict[str, Loader] = {
    "mnist": load_mnist,
    "svhn": load_svhn,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
}
"""Loader of each torchvision data set by name; each is called as ``loader(root, download=...,
**options)`` and returns ``{"train": ImageSet, "test": ImageSet}``."""
