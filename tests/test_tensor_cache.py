"""Decoded data sets are kept as tensors once per machine, not decoded again by every run."""

from __future__ import annotations

import torch

from lightning_stl.data.image_set import ImageSet
from lightning_stl.data.registry import DATASETS, DatasetSpec

CALLS: list[dict] = []


def fake_loader(root, download=False, **options) -> dict[str, ImageSet]:
    CALLS.append(options)
    images = torch.arange(4 * 3 * 2 * 2, dtype=torch.uint8).view(4, 3, 2, 2)
    return {
        "train": ImageSet(images, torch.tensor([0, 1, 2, 1]), 3),
        "test": ImageSet(images[:2], torch.tensor([2, 0]), 3),
    }


def test_second_load_reads_the_cache_and_options_key_it(tmp_path):
    CALLS.clear()
    spec = DatasetSpec(
        "tests.test_tensor_cache:fake_loader", num_classes=3, val_size=1, train_size=4, cache=True
    )
    first = spec.load(tmp_path, download=False, size=2)
    second = spec.load(tmp_path, download=False, size=2)
    assert len(CALLS) == 1  # decoded once
    for split in ("train", "test"):
        assert torch.equal(first[split].images, second[split].images)
        assert torch.equal(first[split].labels, second[split].labels)
        assert second[split].num_classes == 3
    spec.load(tmp_path, download=False, size=3)
    assert len(CALLS) == 2  # other options, other cache file
    assert len(list((tmp_path / ".tensor_cache").glob("*.pt"))) == 2


def test_damaged_cache_is_made_again(tmp_path):
    CALLS.clear()
    spec = DatasetSpec(
        "tests.test_tensor_cache:fake_loader", num_classes=3, val_size=1, train_size=4, cache=True
    )
    spec.load(tmp_path, download=False)
    (cache,) = (tmp_path / ".tensor_cache").glob("*.pt")
    cache.write_bytes(b"not a tensor file")
    again = spec.load(tmp_path, download=False)
    assert len(CALLS) == 2 and len(again["train"]) == 4


def test_the_paper_sets_are_cached_and_the_embedded_ones_need_not():
    assert all(DATASETS[name].cache for name in ("mnist", "svhn", "cifar10", "cifar100"))
    assert not DATASETS["digits"].cache  # scikit-learn's copy loads in milliseconds
