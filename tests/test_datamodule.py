"""The embedded target data, the source/target DataModule, and batch augmentation."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import CombinedLoader

from lightning_stl.data import BatchAugment, ImageSet, SourceTargetDataModule
from lightning_stl.data.augment import random_crop, random_horizontal_flip
from lightning_stl.data.uci_digits import load_uci_digits


def test_uci_digits_split_is_fixed_stratified_and_disjoint():
    a, b = load_uci_digits(seed=0), load_uci_digits(seed=0)
    assert (len(a["train"]), len(a["test"])) == (1297, 500)
    assert torch.equal(a["test"].images, b["test"].images)
    assert a["train"].images.dtype == torch.uint8 and a["train"].image_shape == (1, 8, 8)
    assert int(a["train"].images.max()) == 16 and a["train"].max_value == 16.0
    counts = Counter(a["test"].labels.tolist())
    everything = Counter(a["train"].labels.tolist()) + counts
    for c in range(10):  # each class in proportion to its share of the 1,797
        assert abs(counts[c] - 500 * everything[c] / 1797) <= 1
    train_rows = {tuple(x.flatten().tolist()) for x in a["train"].images}
    overlap = sum(tuple(x.flatten().tolist()) in train_rows for x in a["test"].images)
    assert overlap <= 5  # a handful of digits in the UCI set are exact duplicates
    assert not torch.equal(load_uci_digits(seed=1)["test"].images, a["test"].images)


@pytest.fixture
def digits(data_dir) -> SourceTargetDataModule:
    dm = SourceTargetDataModule(
        target="digits",
        source="rendered_digits",
        root=data_dir,
        target_size=50,
        source_options={"num_images": 400},
        target_batch_size=32,
        source_batch_size=48,
    )
    dm.setup("fit")
    return dm


def test_target_splits_and_stratified_subset(digits, data_dir):
    assert len(digits.val_set) == 300 and len(digits.test_set) == 500
    assert len(digits.train_sets["target"]) == 50 and len(digits.train_sets["source"]) == 400
    assert Counter(digits.train_sets["target"].labels.tolist()) == {c: 5 for c in range(10)}
    other = SourceTargetDataModule(
        root=data_dir, target_size=50, subset_seed=1, source_options={"num_images": 400}
    )
    other.setup()
    assert torch.equal(other.val_set.images, digits.val_set.images)  # split fixed by split_seed
    assert not torch.equal(other.train_sets["target"].images, digits.train_sets["target"].images)
    whole = SourceTargetDataModule(root=data_dir, target_size=None, source=None)
    whole.setup()
    assert len(whole.train_sets["target"]) == 997


def test_training_loader_counts_epochs_of_the_source(digits):
    loader = digits.train_dataloader()
    assert isinstance(loader, CombinedLoader)
    assert digits.steps_per_epoch() == math.ceil(400 / 48)
    batches = list(loader)
    assert len(batches) == 9
    seen_source = Counter()
    for batch, _, _ in batches:
        (xt, yt), (xs, _) = batch["target"], batch["source"]
        assert xt.shape == (32, 1, 8, 8) and xs.shape == (48, 1, 8, 8)
        assert xt.dtype == torch.uint8 and yt.dtype == torch.int64
        seen_source.update(map(bytes, xs.flatten(1).numpy()))
    # 9 sub-batches of 48 = 432 draws: one whole permutation of the 400 source images plus 32
    all_source = Counter(map(bytes, digits.train_sets["source"].images.flatten(1).numpy()))
    assert all(seen_source[k] >= v for k, v in all_source.items())
    assert sum(seen_source.values()) == 432


def test_target_smaller_than_its_sub_batch_repeats_evenly(data_dir):
    dm = SourceTargetDataModule(root=data_dir, target_size=10, target_batch_size=128, source=None)
    dm.setup()
    dm.configure_training(["target"], "target")
    batch, _, _ = next(iter(dm.train_dataloader()))
    labels = Counter(batch["target"][1].tolist())
    # 10 images, one per class: each appears 12 or 13 times in the 128
    assert set(labels) == set(range(10)) and set(labels.values()) <= {12, 13}
    assert dm.steps_per_epoch() == 1


def test_target_basis_counts_target_epochs(digits):
    digits.configure_training(["target"], "target")
    assert digits.steps_per_epoch() == math.ceil(50 / 32)
    batch, _, _ = next(iter(digits.train_dataloader()))
    assert set(batch) == {"target"}
    with pytest.raises(ValueError, match="epoch_basis='both' is not allowed"):
        digits.configure_training(["target"], "both")


def test_preprocess_standardises_with_training_statistics(digits):
    x = digits.train_sets["source"].images
    z = digits.preprocess("source", x, train=False)
    assert z.dtype == torch.float32
    assert abs(float(z.mean())) < 1e-4 and abs(float(z.std()) - 1) < 1e-3
    raw = x.float() / 16
    np.testing.assert_allclose(z.numpy(), ((raw - raw.mean()) / raw.std()).numpy(), atol=1e-4)


def crop_reference(
    x: torch.Tensor, padding: int, dy: torch.Tensor, dx: torch.Tensor
) -> torch.Tensor:
    h, w = x.shape[-2:]
    padded = F.pad(x, (padding,) * 4)
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(len(x))])


def test_random_crop_matches_a_per_sample_reference():
    x = torch.arange(4 * 3 * 6 * 5, dtype=torch.float32).view(4, 3, 6, 5)
    torch.manual_seed(7)
    out = random_crop(x, 2)
    torch.manual_seed(7)
    dy = torch.randint(0, 5, (4,))
    dx = torch.randint(0, 5, (4,))
    assert torch.equal(out, crop_reference(x, 2, dy, dx))
    assert not torch.equal(out, x)


def test_flip_flips_about_half_and_only_horizontally():
    x = torch.randn(2000, 1, 3, 4)
    out = random_horizontal_flip(x)
    flipped = (out == x.flip(3)).flatten(1).all(1)
    same = (out == x).flatten(1).all(1)
    assert bool((flipped | same).all())
    assert 850 < int(flipped.sum()) < 1150


def test_augment_defaults_per_data_set(data_dir):
    from lightning_stl.data import get_dataset

    assert get_dataset("cifar10").augment == BatchAugment(crop_padding=4, horizontal_flip=True)
    assert get_dataset("digits").augment.is_identity
    assert get_dataset("svhn").augment.horizontal_flip is False
    with pytest.raises(ValueError, match="crop_padding=-1"):
        BatchAugment(crop_padding=-1)


def test_image_set_validates_its_tensors():
    with pytest.raises(ValueError, match="uint8"):
        ImageSet(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), 10)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        ImageSet(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 10]), 10)


@pytest.mark.parametrize("size", [0, -3, 2.5, "50"])
def test_target_size_must_be_a_positive_integer(size):
    with pytest.raises(ValueError, match=rf"target_size={size!r} is not allowed"):
        SourceTargetDataModule(target_size=size)


def test_target_loader_gives_the_sets_in_order_without_augmentation(data_dir):
    dm = SourceTargetDataModule(
        target="digits",
        source=None,
        root=data_dir,
        target_size=50,
        target_augment={"crop_padding": 2, "horizontal_flip": True},
        eval_batch_size=16,
    )
    train = dm.target_loader("train")  # sets itself up
    assert dm.train_sets and len(train.dataset) == 50
    for split, data in (("train", dm.train_sets["target"]), ("test", dm.test_set)):
        batches = list(dm.target_loader(split))
        assert torch.equal(torch.cat([x for x, _ in batches]), data.images)  # in order, unshuffled
        assert torch.equal(torch.cat([y for _, y in batches]), data.labels)
        x, y = dm.on_after_batch_transfer(batches[0], 0)  # no trainer: evaluation, no augment
        assert torch.equal(x, dm.preprocess("target", batches[0][0], train=False))
    with pytest.raises(ValueError, match=r"split='val' is not allowed: choose one of train, test"):
        dm.target_loader("val")


def test_a_checkpoint_restored_for_a_test_does_not_move_the_next_fit(tmp_path):
    """``trainer.test(ckpt_path=...)`` restores the DataModule's state too; only a fit's restore
    may continue the streams."""
    from types import SimpleNamespace

    def first_batch(datamodule):
        return next(iter(datamodule.train_dataloader()))[0]["target"][1]

    def fresh():
        datamodule = SourceTargetDataModule(
            target="digits", source=None, root=tmp_path, target_size=40, target_batch_size=8
        )
        datamodule.setup("fit")
        datamodule.configure_training(["target"], "target", seed=3)
        return datamodule

    moved = fresh()
    stream = iter(moved.train_dataloader())
    for _ in range(3):
        next(stream)
    state = moved.state_dict()
    start = first_batch(fresh())
    for fn, continues in (("test", False), ("fit", True)):
        datamodule = fresh()
        datamodule.trainer = SimpleNamespace(state=SimpleNamespace(fn=fn))
        datamodule.load_state_dict(state)
        datamodule.trainer = None
        assert torch.equal(first_batch(datamodule), start) is not continues, fn
