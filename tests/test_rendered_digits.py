"""Tests of the rendered source digits (:mod:`lightning_stl.data.rendered_digits`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_stl.data import glyph_rendering as glyphs
from lightning_stl.data import rendered_digits as rd
from lightning_stl.data.digit_fonts import digit_font_paths
from lightning_stl.data.image_set import ImageSet


@pytest.fixture(scope="module")
def small() -> tuple[np.ndarray, np.ndarray]:
    return rd.render_digits(200, 0)


@pytest.fixture(scope="module")
def large() -> tuple[np.ndarray, np.ndarray]:
    return rd.render_digits(2000, 0)


@pytest.fixture(scope="module")
def uci() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float64), digits.target


# ---------------------------------------------------------------------------------- fonts


def test_fonts_are_the_text_fonts_with_digits() -> None:
    names = {path.name for path in digit_font_paths()}
    for expected in ("DejaVuSans.ttf", "DejaVuSerif-Bold.ttf", "STIXGeneral.ttf", "cmr10.ttf"):
        assert expected in names
    for symbol in ("LastResortHE-Regular.ttf", "cmsy10.ttf", "cmex10.ttf", "cmmi10.ttf"):
        assert symbol not in names
    assert not any(name.startswith(("STIXSiz", "STIXNonUni")) for name in names)
    assert len(names) >= 15


def test_every_font_renders_every_digit() -> None:
    rng = np.random.default_rng(0)
    for path in digit_font_paths():
        for digit in range(10):
            bitmap = None
            for _ in range(5):
                bitmap = glyphs.render_digit_bitmap(digit, path, rng)
                if bitmap is not None:
                    break
            assert bitmap is not None, (path.name, digit)
            assert bitmap.shape == (32, 32) and bitmap.dtype == np.bool_
            assert bitmap.sum() >= glyphs.MIN_ON_PIXELS


def test_render_digit_bitmap_rejects_bad_digit() -> None:
    path = digit_font_paths()[0]
    with pytest.raises(ValueError, match="0..9"):
        glyphs.render_digit_bitmap(10, path, np.random.default_rng(0))


# ---------------------------------------------------------------------------------- blocks


def test_block_counts() -> None:
    bitmaps = np.zeros((2, 32, 32), dtype=bool)
    bitmaps[0] = True
    bitmaps[1, 5, 9] = True  # block (1, 2)
    bitmaps[1, 28:32, 0:4] = True  # block (7, 0), full
    counts = glyphs.block_counts(bitmaps)
    assert counts.dtype == np.uint8 and counts.shape == (2, 8, 8)
    assert (counts[0] == 16).all()
    expected = np.zeros((8, 8), dtype=np.uint8)
    expected[1, 2] = 1
    expected[7, 0] = 16
    np.testing.assert_array_equal(counts[1], expected)
    with pytest.raises(ValueError, match="32, 32"):
        glyphs.block_counts(np.zeros((1, 28, 28), dtype=bool))


# --------------------------------------------------------------------------------- render


def test_shapes_dtypes_and_range(small: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = small
    assert images.shape == (200, 8, 8) and images.dtype == np.uint8
    assert labels.shape == (200,) and labels.dtype == np.int64
    assert int(images.max()) <= 16
    assert int(images.max()) == 16  # some blocks are full
    assert set(labels.tolist()) == set(range(10))


def test_deterministic_and_seed_sensitive(small: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = small
    again_images, again_labels = rd.render_digits(200, 0)
    assert images.tobytes() == again_images.tobytes()
    assert labels.tobytes() == again_labels.tobytes()
    other_images, other_labels = rd.render_digits(200, 1)
    assert images.tobytes() != other_images.tobytes()
    assert not np.array_equal(labels, other_labels)


@pytest.mark.parametrize("num_images", [10, 23, 200])
def test_classes_balanced(num_images: int) -> None:
    _, labels = rd.render_digits(num_images, 5)
    counts = np.bincount(labels, minlength=10)
    assert counts.sum() == num_images
    assert counts.min() >= num_images // 10 and counts.max() <= num_images // 10 + 1


def test_no_blank_images(large: tuple[np.ndarray, np.ndarray]) -> None:
    images, _ = large
    on_pixels = images.reshape(len(images), -1).sum(axis=1, dtype=np.int64)
    assert on_pixels.min() >= glyphs.MIN_ON_PIXELS


def test_unusable_renders_are_redrawn(monkeypatch: pytest.MonkeyPatch) -> None:
    real = glyphs.render_digit_bitmap
    calls = {"n": 0}

    def flaky(digit: int, font_path: Path, rng: np.random.Generator) -> np.ndarray | None:
        calls["n"] += 1
        result = real(digit, font_path, rng)
        return None if calls["n"] % 2 else result  # every other render is "blank"

    monkeypatch.setattr(rd, "render_digit_bitmap", flaky)  # where render_digits looks it up
    images, labels = rd.render_digits(20, 0)
    assert calls["n"] >= 40
    assert images.reshape(20, -1).sum(axis=1).min() >= glyphs.MIN_ON_PIXELS
    assert np.bincount(labels, minlength=10).tolist() == [2] * 10

    monkeypatch.setattr(rd, "render_digit_bitmap", lambda *args: None)
    with pytest.raises(RuntimeError, match="could not render"):
        rd.render_digits(10, 0)


@pytest.mark.parametrize("bad", [9, 0, -3, 10.0, "100", None, True])
def test_bad_num_images(bad: object, tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"num_images=.* is not allowed: it must be an integer >= 10"
    ) as info:
        rd.render_digits(bad, 0)  # type: ignore[arg-type]
    assert repr(bad) in str(info.value) or str(bad) in str(info.value)
    with pytest.raises(ValueError, match="num_images"):
        rd.load_rendered_digits(tmp_path, num_images=bad)  # type: ignore[arg-type]
    assert not (tmp_path / "rendered_digits").exists()


@pytest.mark.parametrize("bad", [-1, 1.5, "0"])
def test_bad_seed(bad: object) -> None:
    with pytest.raises(ValueError, match=r"seed=.* is not allowed: it must be an integer >= 0"):
        rd.render_digits(10, bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- cache


def test_cache_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sets = rd.load_rendered_digits(tmp_path, num_images=50, seed=3)
    assert set(sets) == {"train"}
    train = sets["train"]
    assert isinstance(train, ImageSet)
    assert train.images.shape == (50, 1, 8, 8) and train.images.dtype == torch.uint8
    assert train.labels.shape == (50,) and train.labels.dtype == torch.int64
    assert train.num_classes == 10 and train.max_value == 16.0
    images, labels = rd.render_digits(50, 3)
    np.testing.assert_array_equal(train.images[:, 0].numpy(), images)
    np.testing.assert_array_equal(train.labels.numpy(), labels)

    path = rd.cache_path(tmp_path, 50, 3)
    assert path.is_file() and path.parent == tmp_path / "rendered_digits"
    assert f"v{rd.GENERATOR_VERSION}" in path.name and "50" in path.name and "3" in path.name
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary files left

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cache should have been read")

    monkeypatch.setattr(rd, "render_digits", fail)
    cached = rd.load_rendered_digits(str(tmp_path), download=True, num_images=50, seed=3)["train"]
    assert torch.equal(cached.images, train.images)
    assert torch.equal(cached.labels, train.labels)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "wrong_shape"])
def test_corrupt_cache_is_regenerated(tmp_path: Path, damage: str) -> None:
    first = rd.load_rendered_digits(tmp_path, num_images=20, seed=1)["train"]
    path = rd.cache_path(tmp_path, 20, 1)
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"not a numpy file" * 10)
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        np.savez(path, images=np.zeros((3, 8, 8), np.uint8), labels=np.zeros(3, np.int64),
                 version=np.int64(rd.GENERATOR_VERSION))  # fmt: skip
    second = rd.load_rendered_digits(tmp_path, num_images=20, seed=1)["train"]
    assert torch.equal(first.images, second.images)
    assert torch.equal(first.labels, second.labels)
    assert path.read_bytes() == data  # rewritten whole


def test_failed_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_savez(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(rd.np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        rd.load_rendered_digits(tmp_path, num_images=10, seed=0)
    assert list((tmp_path / "rendered_digits").iterdir()) == []


# ------------------------------------------------------------------- resemblance to UCI


def test_statistics_resemble_uci(
    large: tuple[np.ndarray, np.ndarray], uci: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = large
    uci_images, uci_labels = uci
    rendered_mean = images.astype(np.float64).mean(axis=0)
    uci_mean = uci_images.mean(axis=0)
    r = np.corrcoef(rendered_mean.ravel(), uci_mean.ravel())[0, 1]
    assert r > 0.8, r
    ratio = rendered_mean.mean() / uci_mean.mean()
    assert 1 / 1.5 < ratio < 1.5, ratio
    # class by class the mean images agree too
    for digit in range(10):
        a = images[labels == digit].astype(np.float64).mean(axis=0).ravel()
        b = uci_images[uci_labels == digit].mean(axis=0).ravel()
        assert np.corrcoef(a, b)[0, 1] > 0.6, digit


def test_classifier_trained_on_rendered_digits_reads_uci(
    large: tuple[np.ndarray, np.ndarray], uci: tuple[np.ndarray, np.ndarray]
) -> None:
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    images, labels = large
    uci_images, uci_labels = uci
    classifier = LogisticRegression(max_iter=2000)
    with threadpool_limits(limits=1):  # several BLAS pools on few cores thrash: 0.1 s vs 3 s
        classifier.fit(images.reshape(len(images), -1) / 16.0, labels)
    accuracy = classifier.score(uci_images.reshape(len(uci_images), -1) / 16.0, uci_labels)
    assert accuracy > 0.55, accuracy  # chance is 0.10; measured about 0.63
