"""Digits rendered from matplotlib's fonts and preprocessed like the UCI optdigits images.

This is the *source* data set of the embedded default transfer pair; the *target* is
scikit-learn's :func:`sklearn.datasets.load_digits`, a copy of the test part of the UCI "Optical
Recognition of Handwritten Digits" data set (optdigits; E. Alpaydin and C. Kaynak, 1998). Those
images were made with the preprocessing programs of NIST: each handwritten digit was extracted
from a scanned form and size-normalised into a 32x32 binary bitmap; the bitmap was divided into
non-overlapping 4x4 blocks and the on-pixels of each block were counted, giving an 8x8 image of
integers 0..16 that is smaller and less sensitive to small distortions (E. Alpaydin and
C. Kaynak, "Cascading classifiers", Kybernetika 34(4):369-374, 1998; C. Kaynak, "Methods of
combining multiple classifiers and their applications to handwritten digit recognition", MSc
thesis, Bogazici University, 1995).

Here the digits come from the TrueType fonts that ship with matplotlib (DejaVu, STIXGeneral,
Computer Modern); :func:`~lightning_stl.data.digit_fonts.digit_font_paths` says which fonts
qualify. Each 32x32 bitmap is made by
:func:`~lightning_stl.data.glyph_rendering.render_digit_bitmap` (drawn, randomly distorted,
cropped, scaled into the frame and binarised: the steps are listed in
:mod:`lightning_stl.data.glyph_rendering`), and
:func:`~lightning_stl.data.glyph_rendering.block_counts` then sums the on-pixels of each 4x4
block, exactly as for optdigits, giving 8x8 ``uint8`` images with values 0..16. A render with
fewer than :data:`~lightning_stl.data.glyph_rendering.MIN_ON_PIXELS` on-pixels, or one clipped by
the canvas, is never emitted; it is drawn again with new random parameters.

:func:`render_digits` makes a balanced, seeded set of such images and :func:`load_rendered_digits`
caches it on disk and returns it as an :class:`~lightning_stl.data.image_set.ImageSet` with
``max_value=16``, like the embedded target digits.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from lightning_stl.checks import integer
from lightning_stl.data.digit_fonts import NUM_CLASSES, digit_font_paths
from lightning_stl.data.glyph_rendering import (
    BITMAP_SIDE,
    IMAGE_SIDE,
    MAX_VALUE,
    block_counts,
    render_digit_bitmap,
)
from lightning_stl.data.image_set import ImageSet

__all__ = ["GENERATOR_VERSION", "cache_path", "load_rendered_digits", "render_digits"]

#: Version of the rendering procedure. It is part of the cache file name: bump it whenever the
#: output of :func:`render_digits` for a given ``(num_images, seed)`` changes.
GENERATOR_VERSION = 1

#: At least one image per class.
MIN_NUM_IMAGES = NUM_CLASSES
#: Attempts per image before giving up (a font that keeps failing is a bug, not bad luck).
MAX_ATTEMPTS = 50

_CACHE_KEYS = ("images", "labels", "version")


def render_digits(num_images: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``num_images`` rendered digits: images ``uint8 [n, 8, 8]`` (0..16) and labels ``int64 [n]``.

    Classes are balanced (each of 0..9 occurs ``n // 10`` or ``n // 10 + 1`` times) and shuffled;
    every image uses a font drawn uniformly from
    :func:`~lightning_stl.data.digit_fonts.digit_font_paths`. The output is a pure
    function of ``(num_images, seed)`` (for the installed fonts, Pillow and FreeType): the same
    seed gives byte-identical arrays, a different seed different images.

    Raises:
        ValueError: ``num_images`` is not an int >= 10, or ``seed`` is not a non-negative int.
    """
    num_images = integer("rendered_digits num_images", num_images, low=MIN_NUM_IMAGES)
    seed = integer("rendered_digits seed", seed, low=0)
    fonts = digit_font_paths()
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(num_images, dtype=np.int64) % NUM_CLASSES)
    font_index = rng.integers(0, len(fonts), size=num_images)
    bitmaps = np.empty((num_images, BITMAP_SIDE, BITMAP_SIDE), dtype=bool)
    for i in range(num_images):
        for _ in range(MAX_ATTEMPTS):
            bitmap = render_digit_bitmap(int(labels[i]), fonts[font_index[i]], rng)
            if bitmap is not None:
                bitmaps[i] = bitmap
                break
        else:
            raise RuntimeError(
                f"could not render digit {labels[i]} with font "
                f"{fonts[font_index[i]].name} in {MAX_ATTEMPTS} attempts"
            )
    return block_counts(bitmaps), labels


# ---------------------------------------------------------------------------------------- cache


def cache_path(root: str | Path, num_images: int, seed: int) -> Path:
    """Cache file of ``render_digits(num_images, seed)`` under ``<root>/rendered_digits/``."""
    return (
        Path(root)
        / "rendered_digits"
        / f"rendered_digits_v{GENERATOR_VERSION}_n{num_images}_seed{seed}.npz"
    )


def _read_cache(path: Path, num_images: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached arrays, or ``None`` if the file is missing, unreadable or inconsistent."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if set(data.files) != set(_CACHE_KEYS):
                return None
            images, labels, version = data["images"], data["labels"], data["version"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError):
        return None
    ok = (
        int(version) == GENERATOR_VERSION
        and images.dtype == np.uint8
        and images.shape == (num_images, IMAGE_SIDE, IMAGE_SIDE)
        and labels.dtype == np.int64
        and labels.shape == (num_images,)
        and (images.size == 0 or int(images.max()) <= MAX_VALUE)
        and int(labels.min()) >= 0
        and int(labels.max()) < NUM_CLASSES
    )
    return (images, labels) if ok else None


def _write_cache_atomically(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write the arrays to a temporary file next to ``path``, then rename it onto ``path``.

    ``os.replace`` is atomic on one file system, so a reader sees either no file, the old file or
    the complete new one - never a half-written file, even if this process is killed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o644)  # mkstemp makes it private; a cache may be shared
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, images=images, labels=labels, version=np.int64(GENERATOR_VERSION))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def load_rendered_digits(
    root: str | Path, download: bool = False, num_images: int = 10_000, seed: int = 0
) -> dict[str, ImageSet]:
    """The rendered source digits as ``{"train": ImageSet}`` with images ``[n, 1, 8, 8]``.

    The set is made by :func:`render_digits` on first use and cached in
    ``<root>/rendered_digits/`` in a file whose name holds ``num_images``, ``seed`` and
    :data:`GENERATOR_VERSION`; later calls read that file. A corrupt or inconsistent cache file is
    regenerated. ``download`` is accepted and ignored - there is nothing to download - so that all
    data loaders share one signature. The ``ImageSet`` has ``num_classes=10`` and
    ``max_value=16.0`` (see the module docstring for the optdigits-style preprocessing).

    Raises:
        ValueError: ``num_images`` is not an int >= 10, or ``seed`` is not a non-negative int.
    """
    del download  # nothing to download: the images are rendered locally
    num_images = integer("rendered_digits num_images", num_images, low=MIN_NUM_IMAGES)
    seed = integer("rendered_digits seed", seed, low=0)
    path = cache_path(root, num_images, seed)
    cached = _read_cache(path, num_images)
    if cached is None:
        images, labels = render_digits(num_images, seed)
        _write_cache_atomically(path, images, labels)
    else:
        images, labels = cached
    train = ImageSet(
        images=torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1),
        labels=torch.from_numpy(np.ascontiguousarray(labels)),
        num_classes=NUM_CLASSES,
        max_value=float(MAX_VALUE),
    )
    return {"train": train}
