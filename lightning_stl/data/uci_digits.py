"""The embedded target data set: scikit-learn's copy of the UCI optical handwritten digits.

``sklearn.datasets.load_digits()`` holds 1,797 real handwritten digits (Alpaydin & Kaynak, UCI
optdigits test set): 32x32 binary bitmaps reduced to 8x8 by counting the on-pixels of each 4x4
block, so every pixel is an integer in [0, 16]. It ships inside scikit-learn: no download.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from lightning_stl.checks import integer
from lightning_stl.data.image_set import ImageSet

NUM_IMAGES = 1797


def load_uci_digits(
    root: str | Path | None = None, download: bool = False, test_size: int = 500, seed: int = 0
) -> dict[str, ImageSet]:
    """The 1,797 digits as ``{"train", "test"}`` with a class-stratified test split from ``seed``.

    Images are ``[N, 1, 8, 8]`` uint8 in [0, 16] (``max_value=16``). ``root`` and ``download`` are
    accepted for a uniform loader signature and are not used.
    """
    integer("digits test_size", test_size, 10, NUM_IMAGES - 20)
    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    train_idx, test_idx = train_test_split(
        np.arange(NUM_IMAGES), test_size=test_size, stratify=bunch.target, random_state=seed
    )
    full = ImageSet(images, labels, num_classes=10, max_value=16.0)
    return {"train": full.subset(np.sort(train_idx)), "test": full.subset(np.sort(test_idx))}
