"""Sampling protocols of the SMILE paper: which classes and how many training images a run sees.

SMILE (Section 4.0.1 and Table 3) evaluates fine-tuning on sub-samples of each target's
training set, drawn with a seed:

* ``C:25%/N:400``, ``C:25%/N:800``: choose 25% of the classes at random, then N training
  images from those classes (stratified); train *and* test are restricted to the chosen classes,
  whose labels become 0..K'-1 in the order of their original ids;
* ``C:All/N:15%``, ``C:All/N:100%``: every class, a fraction of the training images;
* ``30%``, ``50%``, ``100%`` (sampling rates, Table 3): a fraction of the training set, the
  same as ``C:All/N:<rate>``.

Any percentage in (0, 100] and any N >= 1 are accepted. Everything here works on label arrays
and indices, so a protocol applies to in-memory :class:`~lightning_stl.data.ImageSet` targets
and file-based :class:`~lightning_stl.data.FileImageSet` targets alike.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedKFold, train_test_split

from lightning_stl.checks import integer

__all__ = [
    "PROTOCOL_FORMS",
    "ProtocolDraw",
    "SamplingProtocol",
    "class_selection",
    "cv_fold_split",
    "parse_protocol",
    "stratified_subset",
]

PROTOCOL_FORMS = "'C:<p>%/N:<n>', 'C:<p>%/N:<q>%', 'C:All/N:<n>', 'C:All/N:<q>%' or '<q>%'"
"""The forms :func:`parse_protocol` accepts (p, q percentages in (0, 100], n an integer >= 1)."""

_NUMBER = r"(\d+(?:\.\d+)?)"
_FULL = re.compile(
    rf"C:(?:(?P<classes>{_NUMBER})%|(?P<all>all))/N:(?P<n>{_NUMBER})(?P<pct>%?)", re.IGNORECASE
)
_RATE = re.compile(rf"(?P<rate>{_NUMBER})%")


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of ``size`` of ``labels``, stratified by class when every class can appear."""
    n = len(labels)
    if size >= n:
        return np.arange(n)
    num_classes = len(np.unique(labels))
    stratify = labels if num_classes <= size <= n - num_classes else None
    chosen, _ = train_test_split(
        np.arange(n), train_size=size, stratify=stratify, random_state=seed
    )
    return np.sort(chosen)


def class_selection(labels: np.ndarray, class_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Indices (sorted) of the samples whose label is in ``class_ids``, and their new labels.

    The new label of a sample is the position of its old label in ``class_ids``, so the same
    ``class_ids`` map an image of class c to the same new label in every split.
    """
    labels = np.asarray(labels)
    class_ids = np.asarray(class_ids, dtype=np.int64)
    if len(np.unique(class_ids)) != len(class_ids):
        raise ValueError(f"class_ids must be distinct, got {class_ids.tolist()}")
    remap = np.full(max(int(labels.max(initial=-1)), int(class_ids.max(initial=-1))) + 1, -1)
    remap[class_ids] = np.arange(len(class_ids))
    indices = np.flatnonzero(remap[labels] >= 0) if len(labels) else np.arange(0)
    return indices, remap[labels[indices]].astype(np.int64)


@dataclass(frozen=True)
class ProtocolDraw:
    """The outcome of :meth:`SamplingProtocol.draw`."""

    class_ids: np.ndarray | None
    """The chosen original class ids (sorted), or ``None`` when every class is kept."""
    indices: np.ndarray
    """Sorted indices into the labels that were drawn from."""


@dataclass(frozen=True)
class SamplingProtocol:
    """A SMILE sampling protocol (Section 4.0.1, Table 3); build one with :func:`parse_protocol`.

    Exactly one of ``num_images`` and ``image_fraction`` is set.
    """

    name: str
    """The protocol as written, e.g. ``"C:25%/N:400"``."""
    class_fraction: float | None
    """Fraction of the classes kept (``None``: all)."""
    num_images: int | None = None
    """N, training images drawn from the kept classes."""
    image_fraction: float | None = None
    """Fraction of the kept classes' training images drawn."""

    def __post_init__(self) -> None:
        if (self.num_images is None) == (self.image_fraction is None):
            raise ValueError(
                f"protocol {self.name!r}: set exactly one of num_images and image_fraction"
            )
        for what, value in (("class", self.class_fraction), ("image", self.image_fraction)):
            if value is not None and not 0 < value <= 1:
                raise ValueError(
                    f"protocol {self.name!r}: the {what} fraction {value:g} is not allowed; "
                    f"it must lie in (0, 1], i.e. a percentage in (0, 100]"
                )
        if self.num_images is not None and self.num_images < 1:
            raise ValueError(f"protocol {self.name!r}: N={self.num_images} must be >= 1")

    @property
    def subsets_classes(self) -> bool:
        """Whether the protocol keeps only some of the classes."""
        return self.class_fraction is not None and self.class_fraction < 1

    def num_classes(self, total: int) -> int:
        """K', the number of classes kept out of ``total`` (rounded half up, at least 1)."""
        if self.class_fraction is None:
            return total
        return max(1, _round_half_up(self.class_fraction * total))

    def draw(
        self, labels: np.ndarray, num_classes: int, seed: int, name: str = "the training set"
    ) -> ProtocolDraw:
        """Choose the classes, then the training images, reproducibly from ``seed``.

        Args:
            labels: ``[n]`` labels (0..num_classes-1) of the images to draw from.
            num_classes: K, the number of classes of the data set.
            seed: Seed of both draws (``data.subset_seed``).
            name: What ``labels`` are, for error messages.

        Returns:
            The chosen classes (``None`` when all are kept) and the drawn indices into
            ``labels``; a fraction draws ``round(fraction · n)`` images (half up, at least 1) of
            the n images of the chosen classes, stratified by class.

        Raises:
            ValueError: N exceeds the images of the chosen classes.
        """
        labels = np.asarray(labels)
        class_ids = None
        pool = np.arange(len(labels))
        if self.subsets_classes:
            kept = self.num_classes(num_classes)
            rng = np.random.default_rng(seed)
            class_ids = np.sort(rng.choice(num_classes, size=kept, replace=False))
            pool, _ = class_selection(labels, class_ids)
        if self.num_images is not None:
            size = self.num_images
            if size > len(pool):
                chosen = "" if class_ids is None else f"the {len(class_ids)} chosen classes of "
                raise ValueError(
                    f"data.protocol={self.name!r} asks for N={size:,} training images, but "
                    f"{chosen}{name} have only {len(pool):,}; allowed: N from 1 to {len(pool):,}"
                )
        else:
            size = max(1, _round_half_up(self.image_fraction * len(pool)))  # type: ignore[operator]
        indices = pool[stratified_subset(labels[pool], size, seed)]
        return ProtocolDraw(class_ids, np.sort(indices))


def parse_protocol(text: str | None) -> SamplingProtocol | None:
    """The :class:`SamplingProtocol` written as ``text`` (``None`` for no protocol).

    Accepted forms (case-insensitive, spaces ignored): ``C:<p>%/N:<n>``, ``C:<p>%/N:<q>%``,
    ``C:All/N:<n>``, ``C:All/N:<q>%`` and ``<q>%`` (SMILE Section 4.0.1 and Table 3), with
    percentages p, q in (0, 100] and an integer n >= 1.

    Raises:
        ValueError: ``text`` is not one of these forms; the message names it and the forms.
    """
    if text is None:
        return None
    if isinstance(text, SamplingProtocol):
        return text
    if not isinstance(text, str):
        raise ValueError(
            f"data.protocol={text!r} is not allowed: write it as a string, one of {PROTOCOL_FORMS}"
        )
    compact = "".join(text.split())
    try:
        full = _FULL.fullmatch(compact)
        if full is not None:
            classes = None if full["all"] else float(full["classes"]) / 100
            if classes == 1.0:
                classes = None
            if full["pct"]:
                return SamplingProtocol(text, classes, image_fraction=float(full["n"]) / 100)
            if not full["n"].isdigit():
                raise ValueError(f"N={full['n']} is not an integer")
            return SamplingProtocol(text, classes, num_images=int(full["n"]))
        rate = _RATE.fullmatch(compact)
        if rate is not None:
            return SamplingProtocol(text, None, image_fraction=float(rate["rate"]) / 100)
    except ValueError as error:
        raise ValueError(
            f"data.protocol={text!r} is not allowed ({error}); allowed: {PROTOCOL_FORMS} with "
            f"percentages in (0, 100] and an integer N >= 1, e.g. 'C:25%/N:400' or '30%'"
        ) from None
    raise ValueError(
        f"data.protocol={text!r} is not allowed; allowed: {PROTOCOL_FORMS} with percentages in "
        f"(0, 100] and an integer N >= 1, e.g. 'C:25%/N:400', 'C:All/N:15%' or '30%'"
    )


def cv_fold_split(
    labels: np.ndarray, folds: int, fold: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(training, validation) indices of fold ``fold`` of a stratified ``folds``-fold split.

    SMILE picks its hyper-parameters by "three-fold cross validation on the original training
    set": validation is fold ``fold``, training the other folds (sklearn's
    :class:`~sklearn.model_selection.StratifiedKFold`, shuffled with ``seed``). Both index
    arrays are sorted.
    """
    labels = np.asarray(labels)
    integer("data.cv_fold", fold, 0, folds - 1)
    if len(labels) < folds:
        raise ValueError(
            f"data.cv_folds={folds} needs at least {folds} training images, got {len(labels)}"
        )
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    train, val = list(splitter.split(np.zeros(len(labels)), labels))[fold]
    return np.sort(train), np.sort(val)
