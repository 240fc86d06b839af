"""SMILE's sampling protocols on labels, and the DataModule's protocol and CV options on digits."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from lightning_stl.data import ImageSet, SamplingProtocol, SourceTargetDataModule, parse_protocol
from lightning_stl.data.protocols import class_selection, cv_fold_split

# 20 classes of 30..49 images each, shuffled
LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(20), np.arange(30, 50)))


@pytest.mark.parametrize(
    ("text", "classes", "n", "fraction"),
    [
        ("C:25%/N:400", 0.25, 400, None),
        ("C:25%/N:800", 0.25, 800, None),
        ("C:All/N:15%", None, None, 0.15),
        ("C:All/N:100%", None, None, 1.0),
        ("c:all / n:15%", None, None, 0.15),
        ("C:100%/N:50", None, 50, None),
        ("C:12.5%/N:10%", 0.125, None, 0.1),
        ("30%", None, None, 0.3),
        ("50%", None, None, 0.5),
        ("100%", None, None, 1.0),
    ],
)
def test_parse_the_papers_forms(text, classes, n, fraction):
    protocol = parse_protocol(text)
    assert protocol == SamplingProtocol(text, classes, num_images=n, image_fraction=fraction)
    assert parse_protocol(protocol) is protocol


def test_no_protocol():
    assert parse_protocol(None) is None


@pytest.mark.parametrize(
    "text", ["C:25%", "N:400", "25", "C:0%/N:400", "C:25%/N:0", "C:25%/N:2.5", "150%", "0%", "x"]
)
def test_invalid_protocols_name_the_value_and_the_forms(text):
    with pytest.raises(ValueError, match="is not allowed") as info:
        parse_protocol(text)
    message = str(info.value)
    assert f"data.protocol={text!r}" in message and "C:<p>%/N:<n>" in message


def test_class_protocol_draws_n_images_of_a_quarter_of_the_classes():
    protocol = parse_protocol("C:25%/N:100")
    draw = protocol.draw(LABELS, 20, seed=0)
    assert protocol.num_classes(20) == 5 and len(draw.class_ids) == 5
    assert list(draw.class_ids) == sorted(draw.class_ids)
    assert len(draw.indices) == 100 and len(set(draw.indices.tolist())) == 100
    counts = Counter(LABELS[draw.indices].tolist())
    assert set(counts) == set(draw.class_ids.tolist())
    totals = Counter(LABELS.tolist())
    pool = sum(totals[c] for c in draw.class_ids.tolist())
    for c in draw.class_ids.tolist():  # stratified: each class in proportion to its images
        assert abs(counts[c] - 100 * totals[c] / pool) <= 1
    again = protocol.draw(LABELS, 20, seed=0)
    assert np.array_equal(again.indices, draw.indices)
    assert np.array_equal(again.class_ids, draw.class_ids)
    other = protocol.draw(LABELS, 20, seed=1)
    assert not np.array_equal(other.class_ids, draw.class_ids)
    assert protocol.num_classes(200) == 50 and protocol.num_classes(67) == 17
    assert protocol.num_classes(196) == 49 and protocol.num_classes(2) == 1


def test_n_beyond_the_chosen_classes_names_the_numbers():
    draw = parse_protocol("C:25%/N:1").draw(LABELS, 20, seed=2)
    available = int(np.isin(LABELS, draw.class_ids).sum())
    with pytest.raises(
        ValueError, match=rf"N=400 training images, but the 5 chosen classes .* only {available}"
    ):
        parse_protocol("C:25%/N:400").draw(LABELS, 20, seed=2)
    with pytest.raises(ValueError, match=rf"N=900 .* only {len(LABELS)}; allowed: N from 1"):
        parse_protocol("C:All/N:900").draw(LABELS, 20, seed=2)


@pytest.mark.parametrize("rate", [0.15, 0.3, 0.5, 1.0])
def test_rates_draw_round_rate_n_images_stratified(rate):
    protocol = SamplingProtocol(f"{rate:.0%}", None, image_fraction=rate)
    draw = protocol.draw(LABELS, 20, seed=0)
    assert draw.class_ids is None
    assert len(draw.indices) == int(np.floor(rate * len(LABELS) + 0.5))
    counts, totals = Counter(LABELS[draw.indices].tolist()), Counter(LABELS.tolist())
    for c in range(20):
        assert abs(counts[c] - rate * totals[c]) <= 1
    if rate < 1:
        assert not np.array_equal(protocol.draw(LABELS, 20, seed=1).indices, draw.indices)


def test_class_selection_relabels_by_position():
    labels = np.array([3, 0, 2, 3, 1, 2])
    indices, new = class_selection(labels, [2, 3])
    assert indices.tolist() == [0, 2, 3, 5] and new.tolist() == [1, 0, 1, 0]
    images = torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1)
    sub = ImageSet(images, torch.as_tensor(labels), 4).select_classes([2, 3])
    assert sub.num_classes == 2 and sub.images.flatten().tolist() == [0, 2, 3, 5]
    assert sub.labels.tolist() == [1, 0, 1, 0]


def test_cv_fold_split_partitions_stratified():
    vals = []
    for fold in range(3):
        train, val = cv_fold_split(LABELS, 3, fold, seed=0)
        assert not set(train) & set(val) and len(train) + len(val) == len(LABELS)
        counts, totals = Counter(LABELS[val].tolist()), Counter(LABELS.tolist())
        assert all(abs(counts[c] - totals[c] / 3) <= 1 for c in range(20))
        vals.append(val)
    assert sorted(np.concatenate(vals).tolist()) == list(range(len(LABELS)))
    with pytest.raises(ValueError, match=r"data.cv_fold=3 is not allowed: .* in \[0, 2\]"):
        cv_fold_split(LABELS, 3, 3, seed=0)


# --------------------------------------------------------------------------------------------
# The DataModule with protocols on the in-memory digits
# --------------------------------------------------------------------------------------------


def digits_dm(data_dir, **kwargs) -> SourceTargetDataModule:
    dm = SourceTargetDataModule(target="digits", source=None, root=data_dir, **kwargs)
    dm.setup()
    return dm


def test_rate_protocol_on_digits(data_dir):
    dm = digits_dm(data_dir, protocol="C:All/N:15%")
    train = dm.train_sets["target"]
    assert len(train) == 150 and len(dm.val_set) == 300  # round(0.15 * 997)
    assert max(Counter(train.labels.tolist()).values()) <= 16
    assert dm.describe()["protocol"] == "C:All/N:15%" and dm.describe()["num_classes"] == 10
    other = digits_dm(data_dir, protocol="C:All/N:15%", subset_seed=1)
    assert not torch.equal(other.train_sets["target"].images, train.images)


def test_class_protocol_on_digits_restricts_every_split(data_dir):
    dm = SourceTargetDataModule(target="digits", source=None, root=data_dir, protocol="C:25%/N:20")
    assert dm.num_target_classes == 3  # round(2.5), half up, before setup
    dm.setup()
    kept = dm.target_class_ids
    whole = digits_dm(data_dir, target_size=None)
    for data, full in ((dm.val_set, whole.val_set), (dm.test_set, whole.test_set)):
        assert data.num_classes == 3 and set(data.labels.tolist()) == {0, 1, 2}
        mask = np.isin(full.labels.numpy(), kept)
        assert torch.equal(data.images, full.images[torch.from_numpy(mask)])
        assert torch.equal(torch.as_tensor(kept)[data.labels], full.labels[torch.from_numpy(mask)])
    assert len(dm.train_sets["target"]) == 20 and dm.num_target_classes == 3
    batch = dm.preprocess("target", dm.test_set.images[:4], train=False)
    assert batch.dtype == torch.float32  # in-memory sets are still normalised on the device


def test_digits_cv_folds_replace_the_held_out_split(data_dir):
    folds = [digits_dm(data_dir, target_size=60, cv_folds=3, cv_fold=k) for k in range(3)]
    drawn = digits_dm(data_dir, target_size=60, val_size=0).train_sets["target"]  # no hold-out
    for dm in folds:
        assert len(dm.val_set) == 20 and len(dm.train_sets["target"]) == 40
        assert dm.has_validation and len(dm.val_dataloader().dataset) == 20
    assert not torch.equal(folds[0].val_set.images, folds[1].val_set.images)
    vals = torch.cat([dm.val_set.images for dm in folds])
    assert sorted(map(bytes, vals.flatten(1).numpy())) == sorted(
        map(bytes, drawn.images.flatten(1).numpy())
    )


def test_val_size_zero_has_no_validation(data_dir):
    dm = digits_dm(data_dir, val_size=0)
    assert not dm.has_validation and len(dm.train_sets["target"]) == 1297 and dm.val_set is None
    with pytest.raises(RuntimeError, match="digits has no validation split"):
        dm.val_dataloader()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cv_folds": 3, "cv_fold": 3}, r"data.cv_fold=3 is not allowed: .* in \[0, 2\]"),
        ({"cv_folds": 3, "cv_fold": -1}, r"data.cv_fold=-1 is not allowed"),
        ({"cv_folds": 1}, r"data.cv_folds=1 is not allowed: it must be an integer >= 2, or null"),
        ({"cv_fold": 2}, r"data.cv_fold=2 is not allowed without data.cv_folds"),
        ({"cv_folds": 3, "val_size": 300}, r"data.val_size=300 and data.cv_folds=3 both"),
        ({"protocol": "30%", "target_size": 50}, r"data.protocol='30%' and data.target_size=50"),
        ({"protocol": "C:25"}, r"data.protocol='C:25' is not allowed"),
        ({"val_size": -1}, r"data.val_size=-1 is not allowed: it must be an integer >= 0"),
        ({"crop_size": 300}, r"data.crop_size=300 exceeds data.resize_size=256"),
    ],
)
def test_datamodule_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SourceTargetDataModule(target="digits", source=None, **kwargs)
