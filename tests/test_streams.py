"""The training streams: permutations keyed by (seed, epoch), and a position that resumes."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from lightning_stl.data.image_set import ImageSet
from lightning_stl.data.loaders import InMemoryDataset, keep_batch
from lightning_stl.data.streams import EpochPermutationSampler, ResumableLoader


def test_each_epoch_is_whole_permutations_then_a_cut_one():
    sampler = EpochPermutationSampler(size=10, num_samples=25, seed=3)
    indices = list(sampler)
    assert len(indices) == 25 == len(sampler)
    assert sorted(indices[:10]) == list(range(10)) and sorted(indices[10:20]) == list(range(10))
    assert len(set(indices[20:])) == 5  # the cut permutation has no repeats
    counts = Counter(indices)
    assert set(counts.values()) <= {2, 3}


def test_an_epoch_is_drawn_again_from_its_seed_and_number_alone():
    a, b = EpochPermutationSampler(50, 50, seed=7), EpochPermutationSampler(50, 50, seed=7)
    torch.manual_seed(0)
    first = list(a)
    torch.manual_seed(1)  # the global RNG plays no part
    assert list(b) == first
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == sorted(first)
    assert list(EpochPermutationSampler(50, 50, seed=8)) != first


def _loader(seed: int = 5, size: int = 40, batch: int = 4) -> ResumableLoader:
    images = torch.arange(size, dtype=torch.uint8).view(size, 1, 1, 1)
    data = InMemoryDataset(ImageSet(images, torch.arange(size) % 10, num_classes=10))
    return ResumableLoader(
        data, EpochPermutationSampler(size, size, seed), batch, collate_fn=keep_batch
    )


def _images(batches) -> list[list[int]]:
    return [x.flatten().tolist() for x, _ in batches]


@pytest.mark.parametrize("consumed", [0, 3, 9, 10])
def test_a_loader_given_a_saved_position_continues_where_the_saved_one_was(consumed):
    original = _loader()
    epoch0 = iter(original)
    seen = [next(epoch0) for _ in range(consumed)]
    state = original.state_dict()
    assert state == {"seed": 5, "epoch": 0, "batches": consumed}
    rest_of_epoch0 = _images(epoch0)
    original.sampler.set_epoch(1)  # what Lightning does at the next epoch's start
    epoch1 = _images(original)

    resumed = _loader(seed=99)  # the seed comes from the state
    resumed.load_state_dict(state)
    if consumed < len(original):
        assert _images(resumed) == rest_of_epoch0  # the rest of epoch 0
        assert len(seen) + len(rest_of_epoch0) == len(original)
    else:
        assert _images(resumed) == epoch1  # epoch 0 was finished: epoch 1 from its start


def test_iterating_the_streams_leaves_the_global_rng_alone():
    loader = _loader()
    state = torch.get_rng_state()
    for _ in range(2):
        list(loader)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.fixture
def image_files(tmp_path):
    """40 small RGB images of two classes, as files (a fine-grained data set in miniature)."""
    import numpy as np
    from PIL import Image

    from lightning_stl.data.file_image_set import FileImageSet

    rng = np.random.default_rng(0)
    names = []
    for i in range(40):
        name = f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / name)
        names.append(name)
    return FileImageSet(tmp_path, np.array(names), torch.arange(40) % 2, num_classes=2)


def _file_loader(data, workers: int) -> ResumableLoader:
    from lightning_stl.data.file_image_set import FileImageDataset, smile_transform

    dataset = FileImageDataset(data, smile_transform(True, resize_size=16, crop_size=12))
    sampler = EpochPermutationSampler(len(dataset), len(dataset), seed=3, with_seeds=True)
    return ResumableLoader(dataset, sampler, 4, num_workers=workers, persistent_workers=workers > 0)


@pytest.mark.parametrize("consumed", [3, 10])  # mid-epoch, and a finished epoch
def test_random_crops_in_workers_resume_exactly(image_files, consumed):
    # Each image's crop and flip come from its place in the stream, not from the worker that
    # loads it: a resumed loader (new workers, other batches per worker) makes the same batches.
    original = _file_loader(image_files, workers=2)
    batches = [x for x, _ in original]  # epoch 0, ten batches
    original.sampler.set_epoch(1)
    epoch1 = [x for x, _ in original]
    state = {"seed": 3, "epoch": 0, "batches": consumed}
    resumed = _file_loader(image_files, workers=2)
    resumed.load_state_dict(state)
    expected = batches[consumed:] if consumed < len(batches) else epoch1
    got = [x for x, _ in resumed]
    assert len(got) == len(expected) and all(
        torch.equal(a, b) for a, b in zip(got, expected, strict=True)
    )
    # the crops are random: two epochs differ, and no worker's RNG decides them
    assert not all(torch.equal(a, b) for a, b in zip(batches, epoch1, strict=True))
    single = _file_loader(image_files, workers=0)
    assert all(torch.equal(a, b) for a, b in zip([x for x, _ in single], batches, strict=True))
