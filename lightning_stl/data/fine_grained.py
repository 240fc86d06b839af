"""The fine-grained target data sets of SMILE, read from their official folder layouts.

SMILE (Section 4.0.1) fine-tunes ImageNet-pretrained networks on five targets. Each loader
``load_X(root, download=False)`` returns the official splits ``{"train": FileImageSet, "test":
FileImageSet}`` (file paths and labels; images are decoded later, in DataLoader workers):

=============  =====================================================================  ===========
name           files under ``root``                                                   train/test
=============  =====================================================================  ===========
cub200         ``CUB_200_2011/{images.txt, image_class_labels.txt,                    5,994/5,794
               train_test_split.txt, classes.txt, images/<class>/<file>.jpg}``
stanford_cars  ``stanford_cars/{devkit/cars_meta.mat, devkit/cars_train_annos.mat,    8,144/8,041
               cars_test_annos_withlabels.mat, cars_train/, cars_test/}``
fgvc_aircraft  ``fgvc-aircraft-2013b/data/{variants.txt,                              6,667/3,333
               images_variant_trainval.txt, images_variant_test.txt, images/}``
mit_indoor67   ``mit_indoor67/{TrainImages.txt, TestImages.txt, Images/<class>/...}``   5,360/1,340
food101        ``food-101/{meta/train.json, meta/test.json, images/<class>/...}``      75,750/25,250
=============  =====================================================================  ===========

Stanford Cars, FGVC-Aircraft and Food-101 are parsed by torchvision's dataset classes (0.19 to
0.29), whose layouts these are; CUB-200-2011 and MIT Indoor-67 have none and their official
files are parsed here. FGVC-Aircraft is labelled at the ``variant`` level (100 classes) and
trains on the official ``trainval`` split (SMILE reports 6,677 images; the files hold 6,667).

Only FGVC-Aircraft and Food-101 can be downloaded (``download=True``, through torchvision).
Absent data raises :class:`~lightning_stl.data.errors.DatasetNotFoundError` naming the folder
and the files expected there, and for the others where to download them by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torchvision.datasets import FGVCAircraft, Food101, StanfordCars

from lightning_stl.data.errors import DatasetNotFoundError
from lightning_stl.data.file_image_set import FileImageSet
from lightning_stl.data.torchvision_sets import _DOWNLOAD_ERRORS, _one_line

__all__ = [
    "FINE_GRAINED_LOADERS",
    "load_cub200",
    "load_fgvc_aircraft",
    "load_food101",
    "load_mit_indoor67",
    "load_stanford_cars",
]

CUB_URL = "https://www.vision.caltech.edu/datasets/cub_200_2011/"
CARS_URL = "https://ai.stanford.edu/~jkrause/cars/car_dataset.html"
INDOOR_URL = "https://web.mit.edu/torralba/www/indoor.html"

Splits = dict[str, FileImageSet]


# --------------------------------------------------------------------------------------------
# Checks and errors
# --------------------------------------------------------------------------------------------


def _present(folder: Path, expected: Sequence[str]) -> list[bool]:
    return [(folder / name.rstrip("/")).exists() for name in expected]


def _require(name: str, folder: Path, expected: Sequence[str], hint: str | None = None) -> None:
    """Raise :class:`DatasetNotFoundError` unless every expected file or folder exists.

    When only some are missing, those are marked "(missing)" in the message.
    """
    present = _present(folder, expected)
    if all(present):
        return
    listed = list(expected)
    if any(present):
        listed = [f if ok else f"{f} (missing)" for f, ok in zip(expected, present, strict=True)]
    raise DatasetNotFoundError(name, folder, listed, hint=hint)


def _manual_download(name: str, download: bool, source: str, into: Path) -> str:
    """The hint for a data set that cannot be downloaded by this program."""
    prefix = "data.download=true cannot fetch it; " if download else ""
    return (
        f"{prefix}{name} cannot be downloaded automatically: {source} and extract into "
        f"{into.resolve()}"
    )


@contextmanager
def _download_errors(name: str, folder: Path, expected: Sequence[str]) -> Iterator[None]:
    try:
        yield
    except _DOWNLOAD_ERRORS as exc:
        raise DatasetNotFoundError(name, folder, list(expected), reason=_one_line(exc)) from exc


def _torchvision_splits(
    make: Callable[[str], Any], splits: dict[str, str], folder: Path, base: str
) -> Splits:
    """``{split: FileImageSet}`` from torchvision datasets ``make(torchvision_split)``.

    The file lists and labels are read from the datasets' ``_samples`` (StanfordCars) or
    ``_image_files``/``_labels`` (FGVCAircraft, Food101); both splits must share class names.
    """
    out: Splits = {}
    classes: list[str] | None = None
    for split, tv_split in splits.items():
        dataset = make(tv_split)
        if hasattr(dataset, "_samples"):
            paths, labels = zip(*dataset._samples, strict=True) if dataset._samples else ((), ())
        elif hasattr(dataset, "_image_files") and hasattr(dataset, "_labels"):
            paths, labels = dataset._image_files, dataset._labels
        else:  # pragma: no cover - a torchvision release that renamed its private lists
            raise RuntimeError(
                f"torchvision's {type(dataset).__name__} has neither _samples nor "
                f"_image_files/_labels; this loader supports torchvision 0.19 to 0.29"
            )
        if classes is None:
            classes = list(dataset.classes)
        elif list(dataset.classes) != classes:
            raise ValueError(
                f"the {split} split of {folder} has other classes than the train split "
                f"({len(dataset.classes)} vs {len(classes)})"
            )
        root = folder / base
        files = [str(Path(p).relative_to(root)) for p in paths]
        out[split] = FileImageSet.from_paths(root, files, labels, classes)
    return out


def _read_table(path: Path, columns: int) -> list[list[str]]:
    """Rows of a whitespace-separated text file (the last column may contain spaces)."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = line.split(maxsplit=columns - 1)
        if len(row) != columns:
            raise ValueError(f"{path}, line {number}: expected {columns} columns, got {line!r}")
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


def load_cub200(root: str | Path, download: bool = False) -> Splits:
    """CUB-200-2011 (Wah et al. 2011): 200 bird species, 5,994 train / 5,794 test images.

    The official split (``train_test_split.txt``) is used; labels are the ids of
    ``image_class_labels.txt`` minus one, class names those of ``classes.txt``.

    Args:
        root: data root; the files are ``<root>/CUB_200_2011/{images.txt,
            image_class_labels.txt, train_test_split.txt, classes.txt, images/}``.
        download: not possible; with ``True`` absent data is reported the same way.

    Raises:
        DatasetNotFoundError: a file is missing (the message says where to download it).
        ValueError: an annotation file is malformed or the files disagree.
    """
    folder = Path(root) / "CUB_200_2011"
    expected = [
        "images.txt",
        "image_class_labels.txt",
        "train_test_split.txt",
        "classes.txt",
        "images/",
    ]
    source = f"download CUB_200_2011.tgz from {CUB_URL}"
    _require("cub200", folder, expected, _manual_download("cub200", download, source, Path(root)))
    class_rows = _read_table(folder / "classes.txt", 2)
    class_ids = [int(i) for i, _ in class_rows]
    if sorted(class_ids) != list(range(1, len(class_ids) + 1)):
        raise ValueError(f"{folder / 'classes.txt'}: class ids must be 1..K, got {class_ids}")
    classes = [name for _, name in sorted(class_rows, key=lambda row: int(row[0]))]
    images = {i: path for i, path in _read_table(folder / "images.txt", 2)}
    labels = {i: int(c) - 1 for i, c in _read_table(folder / "image_class_labels.txt", 2)}
    is_train = {i: flag == "1" for i, flag in _read_table(folder / "train_test_split.txt", 2)}
    if not set(images) == set(labels) == set(is_train):
        raise ValueError(
            f"{folder}: images.txt, image_class_labels.txt and train_test_split.txt list "
            f"different image ids ({len(images)}, {len(labels)}, {len(is_train)} ids)"
        )
    order = sorted(images, key=int)
    out: Splits = {}
    for split, flag in (("train", True), ("test", False)):
        ids = [i for i in order if is_train[i] == flag]
        out[split] = FileImageSet.from_paths(
            folder / "images", [images[i] for i in ids], [labels[i] for i in ids], classes
        )
    return out


def load_stanford_cars(root: str | Path, download: bool = False) -> Splits:
    """Stanford Cars (Krause et al. 2013): 196 car models, 8,144 train / 8,041 test images.

    Parsed by torchvision's :class:`~torchvision.datasets.StanfordCars` (labels are the
    annotations' ``class`` minus one, class names those of ``devkit/cars_meta.mat``).

    Args:
        root: data root; the files are ``<root>/stanford_cars/{devkit/cars_meta.mat,
            devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat, cars_train/,
            cars_test/}``.
        download: not possible (the official site is offline); absent data is reported.

    Raises:
        DatasetNotFoundError: a file is missing (the message says where to get it).
    """
    folder = Path(root) / "stanford_cars"
    expected = [
        "devkit/cars_meta.mat",
        "devkit/cars_train_annos.mat",
        "cars_test_annos_withlabels.mat",
        "cars_train/",
        "cars_test/",
    ]
    source = (
        f"its site ({CARS_URL}) is offline, so get car_devkit.tgz, cars_train.tgz, cars_test.tgz "
        f"and cars_test_annos_withlabels.mat from a mirror"
    )
    _require(
        "stanford_cars",
        folder,
        expected,
        _manual_download("stanford_cars", download, source, folder),
    )
    return _torchvision_splits(
        lambda split: StanfordCars(root, split=split),
        {"train": "train", "test": "test"},
        folder,
        "",
    )


def load_fgvc_aircraft(root: str | Path, download: bool = False) -> Splits:
    """FGVC-Aircraft (Maji et al. 2013) at the ``variant`` level: 100 classes.

    Training is the official ``trainval`` split (6,667 images), test the ``test`` split (3,333),
    parsed by torchvision's :class:`~torchvision.datasets.FGVCAircraft`.

    Args:
        root: data root; the files are ``<root>/fgvc-aircraft-2013b/data/{variants.txt,
            images_variant_trainval.txt, images_variant_test.txt, images/}``.
        download: let torchvision download and extract ``fgvc-aircraft-2013b.tar.gz`` (2.6 GB).

    Raises:
        DatasetNotFoundError: a file is missing with ``download=False``, or the download failed.
    """
    folder = Path(root) / "fgvc-aircraft-2013b"
    expected = [
        "data/variants.txt",
        "data/images_variant_trainval.txt",
        "data/images_variant_test.txt",
        "data/images/",
    ]
    if download and not all(_present(folder, expected)):
        with _download_errors("fgvc_aircraft", folder, expected):
            FGVCAircraft(root, split="test", download=True)
    _require("fgvc_aircraft", folder, expected)
    return _torchvision_splits(
        lambda split: FGVCAircraft(root, split=split, annotation_level="variant"),
        {"train": "trainval", "test": "test"},
        folder,
        "data/images",
    )


def load_mit_indoor67(root: str | Path, download: bool = False) -> Splits:
    """MIT Indoor-67 (Quattoni & Torralba 2009): 67 scene classes, 5,360 train / 1,340 test.

    The official lists ``TrainImages.txt`` and ``TestImages.txt`` give paths relative to
    ``Images/`` (``<class>/<file>.jpg``); the classes are their sorted first components.

    Args:
        root: data root; the files are ``<root>/mit_indoor67/{TrainImages.txt, TestImages.txt,
            Images/}``.
        download: not possible; absent data is reported with where to download it.

    Raises:
        DatasetNotFoundError: a file is missing (the message says where to download it).
    """
    folder = Path(root) / "mit_indoor67"
    expected = ["TrainImages.txt", "TestImages.txt", "Images/"]
    source = f"download indoorCVPR_09.tar, TrainImages.txt and TestImages.txt from {INDOOR_URL}"
    _require(
        "mit_indoor67", folder, expected, _manual_download("mit_indoor67", download, source, folder)
    )
    lists = {
        split: [
            line.strip().replace("\\", "/")
            for line in (folder / file).read_text().splitlines()
            if line.strip()
        ]
        for split, file in (("train", "TrainImages.txt"), ("test", "TestImages.txt"))
    }
    for split, files in lists.items():
        bad = [f for f in files if "/" not in f]
        if bad:
            raise ValueError(
                f"{folder}: the {split} list names {bad[0]!r}, not '<class>/<file>' under Images/"
            )
    classes = sorted({f.split("/", 1)[0] for files in lists.values() for f in files})
    index = {name: i for i, name in enumerate(classes)}
    return {
        split: FileImageSet.from_paths(
            folder / "Images", files, [index[f.split("/", 1)[0]] for f in files], classes
        )
        for split, files in lists.items()
    }


def load_food101(root: str | Path, download: bool = False) -> Splits:
    """Food-101 (Bossard et al. 2014): 101 dishes, 75,750 train / 25,250 test images.

    Parsed by torchvision's :class:`~torchvision.datasets.Food101` (classes are the sorted keys
    of ``meta/train.json``, the same order as ``meta/classes.txt``).

    Args:
        root: data root; the files are ``<root>/food-101/{meta/train.json, meta/test.json,
            images/<class>/<id>.jpg}``.
        download: let torchvision download and extract ``food-101.tar.gz`` (5 GB).

    Raises:
        DatasetNotFoundError: a file is missing with ``download=False``, or the download failed.
    """
    folder = Path(root) / "food-101"
    expected = ["meta/train.json", "meta/test.json", "images/"]
    if download and not all(_present(folder, expected)):
        with _download_errors("food101", folder, expected):
            Food101(root, split="test", download=True)
    _require("food101", folder, expected)
    return _torchvision_splits(
        lambda split: Food101(root, split=split),
        {"train": "train", "test": "test"},
        folder,
        "images",
    )


FINE_GRAINED_LOADERS: dict[str, Callable[..., Splits]] = {
    "cub200": load_cub200,
    "stanford_cars": load_stanford_cars,
    "fgvc_aircraft": load_fgvc_aircraft,
    "mit_indoor67": load_mit_indoor67,
    "food101": load_food101,
}
"""Loader of each fine-grained SMILE target by name, called as ``loader(root, download=...)``."""
