"""Loaders of MNIST, SVHN and CIFAR-10/100 on tiny files written here in the real on-disk formats.

torchvision checks the MD5 of the SVHN and CIFAR files. The tests do not switch that check off:
they point torchvision's table of expected MD5 sums (``SVHN.split_list``, ``CIFAR10.train_list``
/ ``test_list`` / ``meta`` and the same on ``CIFAR100``) at the sums of the files written here,
with ``monkeypatch``, so torchvision's normal integrity check runs and passes. MNIST needs no
such step: torchvision only checks that its raw files exist.

No test reaches the network: ``urllib.request.urlopen`` (which every torchvision download goes
through) is replaced in every test by a function that records the call and fails.
"""

from __future__ import annotations

import hashlib
import pickle
import struct
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torch.nn.functional as F
from torchvision.datasets import CIFAR10, CIFAR100, SVHN

from lightning_stl.data.errors import DatasetNotFoundError
from lightning_stl.data.image_set import ImageSet
from lightning_stl.data.torchvision_sets import (
    TORCHVISION_LOADERS,
    load_cifar10,
    load_cifar100,
    load_mnist,
    load_svhn,
)

OFFLINE = "network is unreachable (test)"


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every URL torchvision tries to open is recorded and fails as with no network."""
    calls: list[str] = []

    def urlopen(request: object, *args: object, **kwargs: object) -> None:
        calls.append(getattr(request, "full_url", str(request)))
        raise urllib.error.URLError(OFFLINE)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return calls


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# Writers of the real formats
# --------------------------------------------------------------------------------------------


def write_idx_images(path: Path, images: np.ndarray) -> None:
    """IDX3 (big-endian): magic 2051, count, rows, cols, then uint8 pixels row-major."""
    n, rows, cols = images.shape
    path.write_bytes(struct.pack(">IIII", 2051, n, rows, cols) + images.astype(np.uint8).tobytes())


def write_idx_labels(path: Path, labels: np.ndarray) -> None:
    """IDX1 (big-endian): magic 2049, count, then uint8 labels."""
    path.write_bytes(struct.pack(">II", 2049, len(labels)) + labels.astype(np.uint8).tobytes())


def mnist_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random digits, except image 0 all 255 (bright) and image 1 all 0 (dark)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[0] = 255
    images[1] = 0
    return images, (np.arange(n) * 7 % 10).astype(np.uint8)


@pytest.fixture
def mnist_root(tmp_path: Path) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    arrays = {"train": mnist_arrays(20, 0), "test": mnist_arrays(10, 1)}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = arrays[split]
        write_idx_images(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return tmp_path, arrays


def cifar_rows(n: int, seed: int) -> np.ndarray:
    """``[n, 3072]`` uint8 rows: the R, G then B 32x32 planes, each row-major.

    Image 0 is zero except three marked pixels: R(h=1, w=2)=200, G(h=5, w=7)=100, B(h=31, w=0)=50.
    """
    rows = np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)
    rows[0] = 0
    rows[0, 0 * 1024 + 1 * 32 + 2] = 200
    rows[0, 1 * 1024 + 5 * 32 + 7] = 100
    rows[0, 2 * 1024 + 31 * 32 + 0] = 50
    return rows


def write_pickle(path: Path, obj: dict) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f)


def write_cifar10(root: Path) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Five train batches of 2 images and a test batch of 3, as in cifar-10-batches-py."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_rows, train_labels = [], []
    for b in range(1, 6):
        rows = cifar_rows(2, b)
        labels = [(2 * b) % 10, (2 * b + 1) % 10]
        write_pickle(
            folder / f"data_batch_{b}",
            {"batch_label": f"training batch {b} of 5", "data": rows, "labels": labels},
        )
        train_rows.append(rows)
        train_labels += labels
    test_rows, test_labels = cifar_rows(3, 9), [9, 0, 4]
    write_pickle(
        folder / "test_batch",
        {"batch_label": "testing batch 1 of 1", "data": test_rows, "labels": test_labels},
    )
    write_pickle(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)]})
    return {"train": (np.vstack(train_rows), train_labels), "test": (test_rows, test_labels)}


def write_cifar100(root: Path) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    arrays = {
        "train": (cifar_rows(6, 3), [0, 99, 42, 7, 63, 99]),
        "test": (cifar_rows(4, 4), [5, 98, 0, 1]),
    }
    for split, (rows, fine) in arrays.items():
        write_pickle(
            folder / split,
            {"data": rows, "fine_labels": fine, "coarse_labels": [f % 20 for f in fine]},
        )
    write_pickle(
        folder / "meta",
        {
            "fine_label_names": [f"fine{i}" for i in range(100)],
            "coarse_label_names": [f"coarse{i}" for i in range(20)],
        },
    )
    return arrays


def trust_cifar_files(monkeypatch: pytest.MonkeyPatch, cls: type[CIFAR10], root: Path) -> None:
    """Make torchvision's expected MD5 sums those of the files written here (test only)."""
    folder = root / cls.base_folder
    monkeypatch.setattr(cls, "train_list", [[n, md5(folder / n)] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, md5(folder / n)] for n, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(folder / cls.meta["filename"])})


def svhn_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``X [32, 32, 3, n]`` (H, W, C, N) and ``y [n, 1]`` with 1..10, 10 meaning digit 0.

    Image 2 (counting from 0) has pixel (h=3, w=4) of channel 1 set to 77 and (h=30, w=1) of
    channel 2 set to 201.
    """
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
    x[:, :, :, 2] = 0
    x[3, 4, 1, 2] = 77
    x[30, 1, 2, 2] = 201
    y = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)  # 1, 2, ..., 10, 1, ...
    return x, y


def write_svhn(root: Path, splits: tuple[str, ...] = ("train", "test")) -> dict:
    sizes = {"train": 12, "test": 11}
    arrays = {}
    for split in splits:
        x, y = svhn_arrays(sizes[split], sizes[split])
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})
        arrays[split] = (x, y)
    return arrays


def trust_svhn_files(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    table = {
        split: [url, name, md5(root / name) if (root / name).is_file() else expected]
        for split, (url, name, expected) in SVHN.split_list.items()
    }
    monkeypatch.setattr(SVHN, "split_list", table)


# --------------------------------------------------------------------------------------------
# MNIST
# --------------------------------------------------------------------------------------------


def test_mnist_resized_to_32_with_three_channels(mnist_root, no_network) -> None:
    root, arrays = mnist_root
    sets = load_mnist(root)
    assert set(sets) == {"train", "test"}
    for split, n in (("train", 20), ("test", 10)):
        s = sets[split]
        assert isinstance(s, ImageSet)
        assert s.images.shape == (n, 3, 32, 32)
        assert s.images.dtype == torch.uint8
        assert s.labels.dtype == torch.int64
        assert s.num_classes == 10 and s.max_value == 255.0
        assert torch.equal(s.labels, torch.from_numpy(arrays[split][1].astype(np.int64)))
        assert torch.equal(s.images[:, 0], s.images[:, 1])
        assert torch.equal(s.images[:, 0], s.images[:, 2])
        assert (s.images[0] == 255).all()  # a bright image stays bright
        assert (s.images[1] == 0).all()  # a dark one stays dark
        # Same as resizing each image in float (antialiased bilinear) and rounding.
        ref = F.interpolate(
            torch.from_numpy(arrays[split][0]).float().unsqueeze(1),
            size=(32, 32),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )
        ref = ref.round().clamp(0, 255).to(torch.uint8)
        assert torch.equal(s.images[:, :1], ref)
    assert no_network == []


def test_mnist_native_size_is_bit_exact(mnist_root) -> None:
    root, arrays = mnist_root
    grey = load_mnist(root, image_size=28, channels=1)
    rgb = load_mnist(root, image_size=28, channels=3)
    for split in ("train", "test"):
        written = torch.from_numpy(arrays[split][0])
        assert grey[split].images.shape == (len(written), 1, 28, 28)
        assert torch.equal(grey[split].images[:, 0], written)
        assert rgb[split].images.shape == (len(written), 3, 28, 28)
        for c in range(3):
            assert torch.equal(rgb[split].images[:, c], written)


def test_mnist_downsampling_keeps_constant_images(mnist_root) -> None:
    root, _ = mnist_root
    s = load_mnist(root, image_size=14, channels=1)["train"]
    assert s.images.shape == (20, 1, 14, 14)
    assert (s.images[0] == 255).all() and (s.images[1] == 0).all()


@pytest.mark.parametrize("options", [{"image_size": 0}, {"channels": 2}])
def test_mnist_rejects_bad_options(mnist_root, options) -> None:
    with pytest.raises(ValueError):
        load_mnist(mnist_root[0], **options)


def test_mnist_download_true_with_files_present_stays_offline(mnist_root, no_network) -> None:
    sets = load_mnist(mnist_root[0], download=True)
    assert len(sets["train"]) == 20 and len(sets["test"]) == 10
    assert no_network == []


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100
# --------------------------------------------------------------------------------------------


def check_cifar_split(s: ImageSet, rows: np.ndarray, labels: list[int], num_classes: int) -> None:
    n = len(rows)
    assert s.images.shape == (n, 3, 32, 32)
    assert s.images.dtype == torch.uint8 and s.images.is_contiguous()
    assert s.labels.dtype == torch.int64 and s.labels.tolist() == labels
    assert s.num_classes == num_classes
    # The marked pixels of image 0: image[c, h, w] is the value written in plane c at (h, w).
    assert int(s.images[0, 0, 1, 2]) == 200
    assert int(s.images[0, 1, 5, 7]) == 100
    assert int(s.images[0, 2, 31, 0]) == 50
    assert int(s.images[0].sum()) == 350
    # Every pixel: plane c, row h, column w of the stored row.
    assert torch.equal(s.images, torch.from_numpy(rows.reshape(n, 3, 32, 32)))


def test_cifar10_reads_pickle_batches(tmp_path, monkeypatch, no_network) -> None:
    arrays = write_cifar10(tmp_path)
    trust_cifar_files(monkeypatch, CIFAR10, tmp_path)
    sets = load_cifar10(tmp_path)
    assert set(sets) == {"train", "test"}
    check_cifar_split(sets["train"], *arrays["train"], num_classes=10)
    check_cifar_split(sets["test"], *arrays["test"], num_classes=10)
    # Present files: download=True loads them without going online.
    assert len(load_cifar10(tmp_path, download=True)["train"]) == 10
    assert no_network == []


def test_cifar100_reads_fine_labels(tmp_path, monkeypatch) -> None:
    arrays = write_cifar100(tmp_path)
    trust_cifar_files(monkeypatch, CIFAR100, tmp_path)
    sets = load_cifar100(tmp_path)
    check_cifar_split(sets["train"], *arrays["train"], num_classes=100)
    check_cifar_split(sets["test"], *arrays["test"], num_classes=100)


def test_cifar10_files_failing_md5_are_named(tmp_path, no_network) -> None:
    """Without the test's MD5 table the written files are not the official ones."""
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError) as info:
        load_cifar10(tmp_path)
    message = str(info.value)
    assert "cifar-10-batches-py/data_batch_3 (missing)" in message
    assert (
        "cifar-10-batches-py/data_batch_1 (present but its MD5 is not the official file's)"
        in message
    )
    assert "data.download=true" in message
    assert no_network == []


# --------------------------------------------------------------------------------------------
# SVHN
# --------------------------------------------------------------------------------------------


def test_svhn_reads_mat_files(tmp_path, monkeypatch, no_network) -> None:
    arrays = write_svhn(tmp_path)
    trust_svhn_files(monkeypatch, tmp_path)
    sets = load_svhn(tmp_path)
    assert set(sets) == {"train", "test"}
    for split, n in (("train", 12), ("test", 11)):
        s = sets[split]
        x, y = arrays[split]
        assert s.images.shape == (n, 3, 32, 32)
        assert s.images.dtype == torch.uint8 and s.images.is_contiguous()
        assert s.labels.dtype == torch.int64 and s.num_classes == 10
        # Label 10 (digit 0) becomes 0; the others keep their value.
        expected = np.where(y[:, 0] == 10, 0, y[:, 0]).astype(np.int64)
        assert s.labels.tolist() == expected.tolist()
        assert s.labels[9] == 0 and int(s.labels.max()) == 9
        # X is [H, W, C, N]: image [c, h, w] is X[h, w, c, n].
        assert int(s.images[2, 1, 3, 4]) == 77
        assert int(s.images[2, 2, 30, 1]) == 201
        assert int(s.images[2].to(torch.int64).sum()) == 77 + 201
        assert torch.equal(s.images, torch.from_numpy(x.transpose(3, 2, 0, 1).copy()))
    assert no_network == []


def test_svhn_partial_files_name_the_missing_one(tmp_path, monkeypatch) -> None:
    write_svhn(tmp_path, splits=("train",))
    trust_svhn_files(monkeypatch, tmp_path)
    with pytest.raises(DatasetNotFoundError) as info:
        load_svhn(tmp_path)
    message = str(info.value)
    assert "test_32x32.mat (missing)" in message
    assert "train_32x32.mat," in message  # present and intact: not marked


# --------------------------------------------------------------------------------------------
# Missing data and failed downloads
# --------------------------------------------------------------------------------------------

EXPECTED = {
    "mnist": [
        "MNIST/raw/train-images-idx3-ubyte",
        "MNIST/raw/train-labels-idx1-ubyte",
        "MNIST/raw/t10k-images-idx3-ubyte",
        "MNIST/raw/t10k-labels-idx1-ubyte",
    ],
    "svhn": ["train_32x32.mat", "test_32x32.mat"],
    "cifar10": [
        *(f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)),
        "cifar-10-batches-py/test_batch",
        "cifar-10-batches-py/batches.meta",
    ],
    "cifar100": ["cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"],
}


def test_registry() -> None:
    expected = {
        "mnist": load_mnist,
        "svhn": load_svhn,
        "cifar10": load_cifar10,
        "cifar100": load_cifar100,
    }
    assert expected == TORCHVISION_LOADERS


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_missing_data_without_download(tmp_path, name, no_network) -> None:
    root = tmp_path / "data"
    with pytest.raises(DatasetNotFoundError) as info:
        TORCHVISION_LOADERS[name](root)
    error = info.value
    message = str(error)
    assert f"'{name}'" in message
    assert str(root.resolve()) in message
    assert "data.download=true" in message
    assert "download failed" not in message
    for file in EXPECTED[name]:
        assert file in message
    assert error.expected == EXPECTED[name]
    assert not isinstance(error, RuntimeError)  # torchvision's own error does not leak
    assert isinstance(error.__cause__, RuntimeError)
    assert no_network == []


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_failed_download_gives_the_reason(tmp_path, name, no_network) -> None:
    root = tmp_path / "data"
    with pytest.raises(DatasetNotFoundError) as info:
        TORCHVISION_LOADERS[name](root, download=True)
    message = str(info.value)
    assert no_network, "the loader should have tried to download"
    assert "the download failed" in message and OFFLINE in message
    assert str(root.resolve()) in message
    for file in EXPECTED[name]:
        assert file in message
    assert "\n" not in message
