"""Training streams that a resumed run continues exactly where the killed one stopped.

Each sub-batch stream of :class:`~lightning_stl.data.SourceTargetDataModule` is a sequence of
random permutations of its set (Smooth Transfer Learning, Eq. 7). Here the permutations of epoch
``e`` are a pure function of ``(seed, e)``, not of the global RNG at the moment the epoch began,
and the loader knows how many batches of its epoch it has handed out. Lightning stores that
position in every checkpoint (it calls ``state_dict`` of each loader of a ``CombinedLoader`` that
has one, the protocol of ``torchdata``'s ``StatefulDataLoader``) and gives it back through
``load_state_dict`` on resume, so the resumed run draws the batches the killed run would have
drawn next.

Why not ``StatefulDataLoader``: it is not installed with torch, and it restores the sampler by
replaying the RNG of a ``RandomSampler``; a permutation keyed by ``(seed, epoch)`` needs neither,
and it also keeps the loader's worker seed (drawn from ``generator`` at each ``iter``) off the
global RNG, which the resumed run restores separately
(:class:`~lightning_stl.callbacks.RandomStateCheckpoint`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

#: Large odd multipliers that spread (seed, epoch, stream) over the 63-bit seed space.
_EPOCH_MIX, _STREAM_MIX = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9


def stream_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """The seed of epoch ``epoch`` of stream ``stream`` of a run seeded ``seed``."""
    return (int(seed) + _EPOCH_MIX * (int(epoch) + 1) + _STREAM_MIX * (int(stream) + 1)) % 2**63


class EpochPermutationSampler(Sampler[int]):
    """``num_samples`` indices of ``range(size)``: whole random permutations one after another
    (the last one cut), as ``RandomSampler(replacement=False, num_samples=...)`` draws them, but
    seeded by ``(seed, epoch)`` so that any epoch can be drawn again.

    With ``with_seeds`` it yields ``(index, seed)``: a data set that transforms each image at
    random in the DataLoader's workers (:class:`~lightning_stl.data.FileImageDataset`) seeds
    that image's transform with it, so the crops and flips depend on the image's place in the
    stream, not on which worker, in which process, drew it (workers keep their RNG across epochs
    and are started anew by a resumed run).

    ``set_epoch`` (which Lightning calls at the start of every epoch, as for a
    ``DistributedSampler``) chooses the epoch; ``start`` skips the first indices of it once.
    """

    def __init__(
        self, size: int, num_samples: int, seed: int, stream: int = 0, with_seeds: bool = False
    ):
        if size < 1 or num_samples < 0:
            raise ValueError(
                f"a stream needs size >= 1 and num_samples >= 0, got {size}, {num_samples}"
            )
        self.size, self.num_samples = int(size), int(num_samples)
        self.seed, self.stream = int(seed), int(stream)
        self.epoch = 0
        self.start = 0
        self.with_seeds = bool(with_seeds)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self, epoch: int) -> torch.Tensor:
        """All ``num_samples`` indices of ``epoch``."""
        generator = torch.Generator().manual_seed(stream_seed(self.seed, epoch, self.stream))
        rounds = -(-self.num_samples // self.size)
        draws = [torch.randperm(self.size, generator=generator) for _ in range(rounds)]
        return torch.cat(draws)[: self.num_samples] if draws else torch.empty(0, dtype=torch.long)

    def __iter__(self) -> Iterator[int | tuple[int, int]]:
        start, self.start = self.start, 0
        indices = self.indices(self.epoch)[start:].tolist()
        if not self.with_seeds:
            yield from indices
            return
        # a seed per position of the epoch, for the random transform of that one image
        base = stream_seed(self.seed, self.epoch, self.stream + 104729)
        for position, index in enumerate(indices, start):
            yield index, (base + _EPOCH_MIX * (position + 1)) % 2**63

    def __len__(self) -> int:
        return self.num_samples


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over an :class:`EpochPermutationSampler` whose position is a state dict.

    ``state_dict()`` is ``{"seed": s, "epoch": e, "batches": b}``: ``b`` batches of epoch ``e`` have been
    handed out. (Lightning does not prefetch from loaders that have a length, so what was
    handed out is what was trained on.) After ``load_state_dict``, the next ``iter`` continues
    epoch ``e`` at batch ``b``, or starts epoch ``e + 1`` when ``e`` was finished. Its
    ``generator`` (the seed of its workers) is reseeded from the epoch at every ``iter``.
    """

    def __init__(self, dataset: Any, sampler: EpochPermutationSampler, batch_size: int, **options):
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=True,
            generator=torch.Generator(),
            **options,
        )
        self._epoch, self._batches = 0, 0
        self._resume: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        sampler: EpochPermutationSampler = self.sampler  # type: ignore[assignment]
        skip = 0
        if self._resume is not None:
            epoch, skip = self._resume["epoch"], self._resume["batches"]
            if skip >= len(self):
                epoch, skip = epoch + 1, 0
            sampler.set_epoch(epoch)
            self._resume = None
        sampler.start = skip * self.batch_size
        self._epoch, self._batches = sampler.epoch, skip
        self.generator.manual_seed(stream_seed(sampler.seed, sampler.epoch, sampler.stream + 7919))
        return self._count(super().__iter__())

    def _count(self, batches: Iterator[Any]) -> Iterator[Any]:
        for batch in batches:
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        sampler: EpochPermutationSampler = self.sampler  # type: ignore[assignment]
        return {"seed": sampler.seed, "epoch": self._epoch, "batches": self._batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.sampler.seed = int(state_dict.get("seed", self.sampler.seed))  # type: ignore[attr-defined]
        self._resume = {"epoch": int(state_dict["epoch"]), "batches": int(state_dict["batches"])}
