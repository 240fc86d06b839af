"""The DataLoaders of the image sets: seeded training streams and in-order evaluation passes.

An in-memory :class:`~lightning_stl.data.image_set.ImageSet` is read with one gather per batch
(:class:`InMemoryDataset`, collated by :func:`keep_batch`); a file-based
:class:`~lightning_stl.data.file_image_set.FileImageSet` is decoded and transformed image by
image in the DataLoader's workers (:class:`~lightning_stl.data.file_image_set.FileImageDataset`).
The training loaders (:func:`stream_loaders`) are resumable streams of seeded permutations
(:mod:`lightning_stl.data.streams`); an evaluation loader (:func:`eval_loader`) goes through its
set once, in order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_stl.data.file_image_set import FileImageDataset, FileImageSet
from lightning_stl.data.image_set import ImageSet
from lightning_stl.data.streams import EpochPermutationSampler, ResumableLoader

__all__ = [
    "AnySet",
    "InMemoryDataset",
    "as_dataset",
    "eval_loader",
    "keep_batch",
    "loader_options",
    "stream_loaders",
]

AnySet = ImageSet | FileImageSet

#: The per-image transform of a file-based set (:func:`~lightning_stl.data.smile_transform`).
Transform = Callable[[Image.Image], Tensor]


class InMemoryDataset(Dataset):
    """Batched indexing into an :class:`ImageSet`: one gather per batch, no per-sample collation."""

    def __init__(self, data: ImageSet):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.data.images[index], self.data.labels[index]

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.data.images[index], self.data.labels[index]


def keep_batch(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Collate function for :meth:`InMemoryDataset.__getitems__`, which already returns a batch."""
    return batch


def as_dataset(data: AnySet, transform: Transform) -> Dataset:
    """The Dataset of ``data``; ``transform`` is applied to each image of a file-based set."""
    if isinstance(data, FileImageSet):
        return FileImageDataset(data, transform)
    return InMemoryDataset(data)


def loader_options(data: AnySet, train: bool, num_workers: int) -> dict[str, Any]:
    """Collation and workers: batched gathers for in-memory sets (persistent workers for
    training only), per-image decoding in persistent workers, into pinned memory on CUDA,
    for file-based sets."""
    if isinstance(data, FileImageSet):
        return {
            "num_workers": num_workers,
            "persistent_workers": num_workers > 0,
            "pin_memory": torch.cuda.is_available(),
        }
    return {
        "collate_fn": keep_batch,
        "num_workers": num_workers,
        "persistent_workers": train and num_workers > 0,
    }


def stream_loaders(
    sets: dict[str, AnySet],
    batch_sizes: dict[str, int],
    steps: int,
    seed: int,
    first_stream: int,
    transform: Transform,
    num_workers: int,
    positions: dict[str, dict[str, int]] | None = None,
) -> dict[str, ResumableLoader]:
    """A training loader of ``steps`` batches for each set of ``sets`` (its domain's batch size
    from ``batch_sizes``), continued from the ``positions`` of a checkpoint when given.

    The i-th set's loader is stream ``first_stream + i`` of ``seed``: a sequence of random
    permutations of the set (:class:`~lightning_stl.data.streams.EpochPermutationSampler`);
    the images of a file-based set are transformed with seeds of their own.
    """
    streams: dict[str, ResumableLoader] = {}
    for index, (domain, data) in enumerate(sets.items()):
        dataset = as_dataset(data, transform)
        batch = batch_sizes[domain]
        sampler = EpochPermutationSampler(
            len(dataset),
            steps * batch,
            seed,
            stream=first_stream + index,
            with_seeds=isinstance(data, FileImageSet),  # transformed image by image
        )
        streams[domain] = ResumableLoader(
            dataset, sampler, batch, **loader_options(data, train=True, num_workers=num_workers)
        )
    if positions is not None:
        if set(positions) != set(streams):
            raise ValueError(
                f"the checkpoint being resumed holds the streams {sorted(positions)}, but "
                f"this stage trains on {sorted(streams)}"
            )
        for domain, loader in streams.items():
            loader.load_state_dict(positions[domain])
    return streams


def eval_loader(
    data: AnySet, transform: Transform, batch_size: int, num_workers: int, seed: int
) -> DataLoader:
    """One pass through ``data`` in order (no shuffle), in batches of ``batch_size``."""
    return DataLoader(
        as_dataset(data, transform),
        batch_size=batch_size,
        shuffle=False,
        # its own seed for the workers: creating the iterator (Lightning does so on resume
        # where the uninterrupted run did not) leaves the global RNG of training alone
        generator=torch.Generator().manual_seed(seed),
        **loader_options(data, train=False, num_workers=num_workers),
    )
