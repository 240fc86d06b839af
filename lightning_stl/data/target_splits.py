"""Which target images train, validate and test, and the checks of the settings that say so.

:func:`split_target` takes the target's official splits and, in order: holds out ``val_size``
images of the training split for validation (stratified, seeded by ``split_seed``); draws the
training images from the rest (a sampling protocol of :mod:`lightning_stl.data.protocols`, or
``target_size`` of them, seeded by ``subset_seed``), a protocol's class subset restricting every
split; and splits the drawn set into the training and validation parts of a cross-validation
fold (``cv_folds``, ``cv_fold``; SMILE's "three-fold cross validation on the original training
set"). :func:`check_target_size` and :func:`check_cv` check those settings where they enter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split

from lightning_stl.checks import integer
from lightning_stl.data.file_image_set import FileImageSet
from lightning_stl.data.image_set import ImageSet
from lightning_stl.data.protocols import SamplingProtocol, cv_fold_split, stratified_subset

__all__ = ["TargetSplits", "check_cv", "check_target_size", "held_out_size", "split_target"]


@dataclass(frozen=True)
class TargetSplits:
    """The target's training, validation (``None``: none) and test sets."""

    train: ImageSet | FileImageSet
    val: ImageSet | FileImageSet | None
    test: ImageSet | FileImageSet
    class_ids: np.ndarray | None
    """The original ids of the classes a protocol kept (``None``: all)."""


def check_target_size(
    target_size: Any, val_size: int, official_train_size: int | None, name: str
) -> None:
    """N (``target_size``; ``None``: the whole pool) against the training images of the target
    ``name`` that ``val_size`` leaves (unchecked where ``official_train_size`` is ``None``)."""
    n = integer("data.target_size", target_size, low=1, null=True, also="null (all of them)")
    if n is None or official_train_size is None:
        return
    pool = official_train_size - val_size
    if pool < 1:
        raise ValueError(
            f"data.val_size={val_size} is not allowed: {name} has "
            f"{official_train_size:,} training images, so 0 to {official_train_size - 1:,} can "
            "be held out for validation"
        )
    if n > pool:
        raise ValueError(
            f"data.target_size={n} exceeds the {pool:,} training images of "
            f"{name} ({official_train_size:,} minus {val_size:,} "
            f"held out for validation); allowed: 1 to {pool:,}"
        )


def check_cv(cv_folds: Any, cv_fold: Any) -> tuple[int | None, int]:
    """``(cv_folds, cv_fold)`` after checking them; errors name the value and what is allowed.

    ``cv_fold=None`` means "every fold" to :func:`lightning_stl.run.train`, which builds one
    DataModule per fold; a DataModule itself is one fold.
    """
    if cv_fold is None and cv_folds is None:
        return None, 0
    if cv_fold is None:
        raise ValueError(
            f"data.cv_fold=null with data.cv_folds={cv_folds}: a DataModule holds one fold; "
            "choose cv_fold in 0..cv_folds-1 (lightning_stl.run trains every fold for null)"
        )
    integer("data.cv_fold", cv_fold, null=True, also="null")
    if cv_folds is None:
        if cv_fold != 0:
            raise ValueError(
                f"data.cv_fold={cv_fold} is not allowed without data.cv_folds: set data.cv_folds "
                f"(e.g. 3) to cross-validate, or leave cv_fold at 0"
            )
        return None, 0
    folds = integer("data.cv_folds", cv_folds, low=2, also="null")
    return folds, integer("data.cv_fold", cv_fold, low=0, high=folds - 1)


def held_out_size(val_size: int | None, cv_folds: int | None, official: int) -> int:
    """The images held out for validation: ``val_size``, the data set's ``official`` size for
    ``None``, and none when a cross-validation fold validates (``val_size`` must then be 0 or
    ``None``)."""
    if cv_folds is not None and val_size:
        raise ValueError(
            f"data.val_size={val_size} and data.cv_folds={cv_folds} both choose the "
            f"validation images; set data.val_size=0 (or null) to validate on a fold"
        )
    if cv_folds is not None:
        return 0
    return val_size if val_size is not None else official


def split_target(
    train: ImageSet | FileImageSet,
    test: ImageSet | FileImageSet,
    *,
    name: str,
    val_size: int,
    split_seed: int,
    subset_seed: int,
    target_size: int | None = None,
    protocol: SamplingProtocol | None = None,
    cv_folds: int | None = None,
    cv_fold: int = 0,
) -> TargetSplits:
    """The target ``name``'s sets from its official ``train`` and ``test`` splits (see the
    module docstring for the order of the steps)."""
    labels = train.labels.numpy()
    val_set: ImageSet | FileImageSet | None = None
    pool_idx = np.arange(len(train))
    if val_size > 0:
        if val_size >= len(train):
            raise ValueError(
                f"{name} has {len(train)} training images, too few to hold out "
                f"{val_size} for validation"
            )
        pool_idx, val_idx = train_test_split(
            pool_idx, test_size=val_size, stratify=labels, random_state=split_seed
        )
        pool_idx = np.sort(pool_idx)
        val_set = train.subset(np.sort(val_idx))
    check_target_size(target_size, val_size, len(train), name)
    class_ids = None
    if protocol is not None:
        draw = protocol.draw(
            labels[pool_idx],
            train.num_classes,
            subset_seed,
            name=f"the {len(pool_idx):,} training images of {name}",
        )
        pool_idx = pool_idx[draw.indices]
        class_ids = draw.class_ids
    elif target_size is not None:
        pool_idx = pool_idx[stratified_subset(labels[pool_idx], target_size, subset_seed)]
    train_set = train.subset(pool_idx)
    if class_ids is not None:
        train_set, test = train_set.select_classes(class_ids), test.select_classes(class_ids)
        val_set = val_set.select_classes(class_ids) if val_set is not None else None
    if cv_folds is not None:
        fit_idx, fold_idx = cv_fold_split(train_set.labels.numpy(), cv_folds, cv_fold, split_seed)
        train_set, val_set = train_set.subset(fit_idx), train_set.subset(fold_idx)
    return TargetSplits(train_set, val_set, test, class_ids)
