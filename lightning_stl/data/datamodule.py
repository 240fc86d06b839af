"""A source and a target data set as one LightningDataModule.

Training yields a ``CombinedLoader`` of ``{"target": (x, y), "source": (x, y)}``: two sub-batches
drawn uniformly from the target training subset and from the source set (Smooth Transfer
Learning, Eq. 7). An epoch is a fixed number of steps, counted with respect to the source set by
default ("380 epochs with respect to the source dataset", Appendix A.1), or to the target set for
single-data-set training. Each sub-batch stream is a sequence of random permutations of its set,
so a set smaller than its sub-batch appears ⌊B/N⌋ or ⌈B/N⌉ times in each sub-batch.

Validation and test use the target's held-out validation split and its official test split.

The fine-grained targets of SMILE are :class:`~lightning_stl.data.FileImageSet` s: their loaders
decode and transform each image in the DataLoader's workers (SMILE, Section 4.0.2), so their
batches arrive normalised and :meth:`SourceTargetDataModule.preprocess` leaves them alone. A
sampling protocol (:mod:`lightning_stl.data.protocols`) chooses the classes and training images;
SMILE holds nothing out (``val_size=0``) and picks hyper-parameters by k-fold cross-validation
on the drawn training set (``cv_folds``, ``cv_fold``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import CombinedLoader
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_stl.data.augment import BatchAugment, Normalize
from lightning_stl.data.file_image_set import FileImageDataset, FileImageSet, smile_transform
from lightning_stl.data.image_set import ImageSet
from lightning_stl.data.protocols import (
    SamplingProtocol,
    cv_fold_split,
    parse_protocol,
    stratified_subset,
)
from lightning_stl.data.registry import get_dataset
from lightning_stl.data.streams import EpochPermutationSampler, ResumableLoader
from lightning_stl.schedule import SOURCE, TARGET

EPOCH_BASES = (SOURCE, TARGET)

AnySet = ImageSet | FileImageSet


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


class SourceTargetDataModule(L.LightningDataModule):
    """Target (training subset of size N, validation, test) and source (training) data.

    Args:
        target: Name of the target data set (see :data:`lightning_stl.data.registry.DATASETS`).
        source: Name of the source data set, or ``None`` for target-only work.
        root: Folder the data sets are read from (and downloaded to, with ``download``).
        download: Download absent data in ``prepare_data``.
        target_size: N, the size of the target training subset; ``None`` for the whole pool.
        val_size: Images of the target's official training split held out for validation;
            ``None`` takes the data set's own (the paper's) size; 0 holds nothing out (no
            validation unless ``cv_folds``; the caller then sets ``limit_val_batches=0``).
        target_batch_size, source_batch_size: Sub-batch sizes (128 each in the paper).
        eval_batch_size: Batch size for validation and test.
        split_seed: Seed of the fixed target train/validation (and, for digits, test) split.
        subset_seed: Seed of the draw of the N training images.
        target_options, source_options: Keyword options of the data sets' loaders.
        target_augment, source_augment: Batch augmentation; ``None`` takes the data set's default.
        num_workers: DataLoader workers (0 is fastest for in-memory data; file-based sets
            decode images in them, so give those your CPU count).
        protocol: SMILE sampling protocol of the target's training images, e.g.
            ``"C:25%/N:400"``, ``"C:All/N:15%"`` or ``"30%"`` (see
            :func:`~lightning_stl.data.protocols.parse_protocol`); drawn with ``subset_seed``.
            A class subset restricts every split and relabels it 0..K'-1. Replaces
            ``target_size``.
        cv_folds: Split the drawn training set into this many stratified folds (seeded by
            ``split_seed``) and validate on fold ``cv_fold``, training on the others (SMILE's
            "three-fold cross validation on the original training set"). Replaces the
            held-out validation split, so ``val_size`` must then be 0 or ``None``.
        cv_fold: The validation fold, in ``[0, cv_folds)``.
        resize_size, crop_size: Sizes of the per-image transform of file-based sets (SMILE,
            Section 4.0.2: resize to 256 x 256, crop 224).
        keep_aspect: Resize the shorter side to ``resize_size`` instead of to a square (the
            authors' code for CUB-200-2011; see
            :func:`~lightning_stl.data.file_image_set.smile_transform`).
    """

    def __init__(
        self,
        target: str = "digits",
        source: str | None = "rendered_digits",
        root: str | Path = "data",
        download: bool = False,
        target_size: int | None = None,
        val_size: int | None = None,
        target_batch_size: int = 128,
        source_batch_size: int = 128,
        eval_batch_size: int = 1000,
        split_seed: int = 0,
        subset_seed: int = 0,
        target_options: dict[str, Any] | None = None,
        source_options: dict[str, Any] | None = None,
        target_augment: BatchAugment | dict[str, Any] | None = None,
        source_augment: BatchAugment | dict[str, Any] | None = None,
        num_workers: int = 0,
        protocol: str | SamplingProtocol | None = None,
        cv_folds: int | None = None,
        cv_fold: int | None = 0,
        resize_size: int = 256,
        crop_size: int = 224,
        keep_aspect: bool = False,
    ):
        super().__init__()
        self.target_spec = get_dataset(target)
        self.source_spec = get_dataset(source) if source is not None else None
        for name, value in (
            ("target_batch_size", target_batch_size),
            ("source_batch_size", source_batch_size),
            ("eval_batch_size", eval_batch_size),
        ):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"data.{name}={value} is not allowed: it must be an integer > 0")
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers} is not allowed: it must be >= 0")
        self.target_name, self.source_name = target, source
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(
                f"data.root={self.root} is not a folder but a file (data.root is "
                "paths.data_dir, which $LIGHTNING_STL_DATA sets): point it at the data folder"
            )
        self.download = bool(download)
        self.target_size = target_size
        if val_size is not None and (
            isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 0
        ):
            raise ValueError(f"data.val_size={val_size} is not allowed: it must be an integer >= 0")
        self.protocol = parse_protocol(protocol)
        if self.protocol is not None and target_size is not None:
            raise ValueError(
                f"data.protocol={self.protocol.name!r} and data.target_size={target_size} both "
                f"choose the training images; set one of them to null"
            )
        self.cv_folds, self.cv_fold = _check_cv(cv_folds, cv_fold)
        if self.cv_folds is not None and val_size:
            raise ValueError(
                f"data.val_size={val_size} and data.cv_folds={self.cv_folds} both choose the "
                f"validation images; set data.val_size=0 (or null) to validate on a fold"
            )
        if self.cv_folds is not None:
            self.val_size = 0
        else:
            self.val_size = val_size if val_size is not None else self.target_spec.val_size
        self._check_target_size(self.target_spec.train_size)
        self.batch_size = {TARGET: target_batch_size, SOURCE: source_batch_size}
        self.eval_batch_size = eval_batch_size
        self.split_seed, self.subset_seed = int(split_seed), int(subset_seed)
        self.options = {TARGET: dict(target_options or {}), SOURCE: dict(source_options or {})}
        self.augment = {
            TARGET: _as_augment(target_augment, self.target_spec.augment, "target_augment"),
            SOURCE: _as_augment(
                source_augment,
                self.source_spec.augment if self.source_spec else BatchAugment(),
                "source_augment",
            ),
        }
        self.num_workers = int(num_workers)
        self.transforms = {
            train: smile_transform(train, resize_size, crop_size, keep_aspect)
            for train in (True, False)
        }
        self.resize_size, self.crop_size, self.keep_aspect = resize_size, crop_size, keep_aspect
        self.train_domains: tuple[str, ...] = (TARGET, SOURCE) if source is not None else (TARGET,)
        self.epoch_basis = SOURCE if source is not None else TARGET
        self.stream_seed: int | None = None
        self._train_loaders: dict[str, ResumableLoader] = {}
        self._resume_positions: dict[str, dict[str, int]] | None = None
        self.train_sets: dict[str, AnySet] = {}
        self.val_set: AnySet | None = None
        self.test_set: AnySet | None = None
        self.target_class_ids: np.ndarray | None = None
        """The original ids of the classes a protocol kept (``None``: all), after setup."""
        self.normalize: dict[str, Normalize] = {}

    # ------------------------------------------------------------------ configuration
    def _check_target_size(self, official_train_size: int | None) -> None:
        n = self.target_size
        if n is None:
            return
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
            raise ValueError(f"data.target_size={n} is not allowed: it must be an integer >= 1")
        if official_train_size is None:
            return
        pool = official_train_size - self.val_size
        if pool < 1:
            raise ValueError(
                f"data.val_size={self.val_size} is not allowed: {self.target_name} has "
                f"{official_train_size:,} training images, so 0 to {official_train_size - 1:,} can "
                "be held out for validation"
            )
        if n > pool:
            raise ValueError(
                f"data.target_size={n} exceeds the {pool:,} training images of "
                f"{self.target_name} ({official_train_size:,} minus {self.val_size:,} "
                f"held out for validation); allowed: 1 to {pool:,}"
            )

    def configure_training(
        self, domains: Sequence[str], epoch_basis: str, seed: int | None = None
    ) -> None:
        """Which sub-batches the training loader yields, which set an epoch counts, and the
        seed of the sub-batch streams (``None``: drawn from the global RNG by the first
        :meth:`train_dataloader`)."""
        domains = tuple(d for d in (TARGET, SOURCE) if d in domains)
        if not domains:
            raise ValueError("training needs at least one of the domains 'target' and 'source'")
        if SOURCE in domains and self.source_spec is None:
            raise ValueError("this method trains on the source, but data.source is null")
        if epoch_basis not in EPOCH_BASES:
            raise ValueError(
                f"epoch_basis={epoch_basis!r} is not allowed: choose one of {', '.join(EPOCH_BASES)}"
            )
        if epoch_basis == SOURCE and self.source_spec is None:
            raise ValueError(
                "epoch_basis='source' needs a source data set, but data.source is null"
            )
        self.train_domains, self.epoch_basis = domains, epoch_basis
        self.stream_seed = None if seed is None else int(seed)

    # ------------------------------------------------------------------ loading
    def prepare_data(self) -> None:
        """Download absent data (``data.download=true``); render and cache generated sets."""
        if self.download:
            self.target_spec.load(self.root, download=True, **self.options[TARGET])
            if self.source_spec is not None:
                self.source_spec.load(self.root, download=True, **self.options[SOURCE])

    def setup(self, stage: str | None = None) -> None:
        """Load the sets; hold out validation; draw the training images; split the CV fold.

        In order: the held-out validation split (``val_size`` images, stratified, seeded by
        ``split_seed``) of the official training split; the draw of the training images from
        the rest (``protocol`` or ``target_size``, seeded by ``subset_seed``), a protocol's
        class subset applied to every split; and the cross-validation fold (``cv_folds``).
        """
        if self.test_set is not None:
            return
        target = self.target_spec.load(self.root, download=False, **self.options[TARGET])
        train, test = target["train"], target["test"]
        labels = train.labels.numpy()
        val_set: AnySet | None = None
        pool_idx = np.arange(len(train))
        if self.val_size > 0:
            if self.val_size >= len(train):
                raise ValueError(
                    f"{self.target_name} has {len(train)} training images, too few to hold out "
                    f"{self.val_size} for validation"
                )
            pool_idx, val_idx = train_test_split(
                pool_idx, test_size=self.val_size, stratify=labels, random_state=self.split_seed
            )
            pool_idx = np.sort(pool_idx)
            val_set = train.subset(np.sort(val_idx))
        self._check_target_size(len(train))
        if self.protocol is not None:
            draw = self.protocol.draw(
                labels[pool_idx],
                train.num_classes,
                self.subset_seed,
                name=f"the {len(pool_idx):,} training images of {self.target_name}",
            )
            pool_idx = pool_idx[draw.indices]
            self.target_class_ids = draw.class_ids
        elif self.target_size is not None:
            pool_idx = pool_idx[
                stratified_subset(labels[pool_idx], self.target_size, self.subset_seed)
            ]
        train_set = train.subset(pool_idx)
        if self.target_class_ids is not None:
            ids = self.target_class_ids
            train_set, test = train_set.select_classes(ids), test.select_classes(ids)
            val_set = val_set.select_classes(ids) if val_set is not None else None
        if self.cv_folds is not None:
            fit_idx, fold_idx = cv_fold_split(
                train_set.labels.numpy(), self.cv_folds, self.cv_fold, self.split_seed
            )
            train_set, val_set = train_set.subset(fit_idx), train_set.subset(fold_idx)
        self.train_sets[TARGET], self.val_set, self.test_set = train_set, val_set, test
        if self.source_spec is not None:
            self.train_sets[SOURCE] = self.source_spec.load(
                self.root, download=False, **self.options[SOURCE]
            )["train"]
        for domain, data in self.train_sets.items():
            if isinstance(data, ImageSet):
                mean, std = data.channel_stats()
                self.normalize[domain] = Normalize(mean, std, data.max_value)

    # ------------------------------------------------------------------ properties
    @property
    def num_target_classes(self) -> int:
        """K' of the target: the loaded (and protocol-restricted) class count after setup, the
        registry's count (times a protocol's class fraction) before it."""
        if self.test_set is not None:
            return self.test_set.num_classes
        if self.protocol is not None:
            return self.protocol.num_classes(self.target_spec.num_classes)
        return self.target_spec.num_classes

    @property
    def has_validation(self) -> bool:
        """Whether there is a validation split (held out, or a cross-validation fold)."""
        return self.cv_folds is not None or self.val_size > 0

    @property
    def num_source_classes(self) -> int:
        return self.source_spec.num_classes if self.source_spec else self.target_spec.num_classes

    def _world(self) -> tuple[int, int]:
        """(number of processes, this one's rank) of the trainer, (1, 0) without one."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def channels(self) -> dict[str, int]:
        """Image channels of each training set (after :meth:`setup`); file-based sets are RGB."""
        return {
            domain: data.images.shape[1] if isinstance(data, ImageSet) else 3
            for domain, data in self.train_sets.items()
        }

    def steps_per_epoch(self) -> int:
        """Optimiser steps in one epoch: ⌈|basis set| / (its sub-batch size · processes)⌉."""
        world, _ = self._world()
        basis = self.epoch_basis
        return math.ceil(len(self.train_sets[basis]) / (self.batch_size[basis] * world))

    def describe(self) -> dict[str, Any]:
        """Sizes and names, for result files (after :meth:`setup`)."""
        return {
            "target": self.target_name,
            "source": self.source_name,
            "target_size": len(self.train_sets[TARGET]),
            "source_size": len(self.train_sets[SOURCE]) if SOURCE in self.train_sets else 0,
            "val_size": len(self.val_set) if self.val_set is not None else 0,
            "test_size": len(self.test_set) if self.test_set is not None else 0,
            "split_seed": self.split_seed,
            "subset_seed": self.subset_seed,
            "num_classes": self.num_target_classes,
            "protocol": self.protocol.name if self.protocol is not None else None,
            "target_class_ids": (
                self.target_class_ids.tolist() if self.target_class_ids is not None else None
            ),
            "cv_folds": self.cv_folds,
            "cv_fold": self.cv_fold if self.cv_folds is not None else None,
        }

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> CombinedLoader:
        """Sub-batch streams of ``steps_per_epoch()`` batches each.

        Epoch e of each stream is a permutation drawn from ``(stream_seed, e)``, and the
        loaders' positions are saved in checkpoints (:mod:`lightning_stl.data.streams`), so a
        resumed run trains on the batches the killed one would have. Under DDP every process
        draws its own uniform stream (its rank is part of the stream's seed), so the global
        sub-batch is processes x sub-batch size; run it with ``use_distributed_sampler=False``
        (``trainer=ddp`` does).
        """
        steps = self.steps_per_epoch()
        world, rank = self._world()
        connector = getattr(getattr(self, "trainer", None), "_accelerator_connector", None)
        if world > 1 and getattr(connector, "use_distributed_sampler", False):
            raise ValueError(
                f"trainer.use_distributed_sampler=true with {world} processes: each process "
                "draws its own stream of sub-batches here, and Lightning's distributed sampler "
                "would replace it; use trainer=ddp (it sets use_distributed_sampler: false)"
            )
        seed = self.stream_seed
        if seed is None:  # not chosen by configure_training: from the seeded global RNG
            seed = self.stream_seed = int(torch.randint(0, 2**62, ()))
        loaders = {}
        for index, domain in enumerate(self.train_domains):
            data = self.train_sets[domain]
            dataset = self._dataset(data, train=True)
            batch = self.batch_size[domain]
            sampler = EpochPermutationSampler(
                len(dataset),
                steps * batch,
                seed,
                stream=index + len(EPOCH_BASES) * rank,
                with_seeds=isinstance(data, FileImageSet),  # transformed image by image
            )
            loaders[domain] = ResumableLoader(
                dataset, sampler, batch, **self._loader_options(data, train=True)
            )
        positions, self._resume_positions = self._resume_positions, None
        if positions is not None:
            if set(positions) != set(loaders):
                raise ValueError(
                    f"the checkpoint being resumed holds the streams {sorted(positions)}, but "
                    f"this stage trains on {sorted(loaders)}"
                )
            for domain, loader in loaders.items():
                loader.load_state_dict(positions[domain])
        self._train_loaders = loaders
        return CombinedLoader(loaders, mode="min_size")

    def state_dict(self) -> dict[str, Any]:
        """Where each training stream of the running fit is (saved in checkpoints by Lightning).

        Lightning also asks the loaders themselves, but gives their states back only when the
        fit loop builds its loader after the restore, and it is built before, when
        ``configure_optimizers`` asks for ``estimated_stepping_batches``; the DataModule's state
        is restored first, so the loader built then starts where the checkpoint was."""
        return {"streams": {d: loader.state_dict() for d, loader in self._train_loaders.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the streams of ``state_dict`` in the next :meth:`train_dataloader`."""
        self._resume_positions = dict(state_dict["streams"]) if state_dict.get("streams") else None

    def _dataset(self, data: AnySet, train: bool) -> Dataset:
        if isinstance(data, FileImageSet):
            return FileImageDataset(data, self.transforms[train])
        return InMemoryDataset(data)

    def _loader_options(self, data: AnySet, train: bool) -> dict[str, Any]:
        """Collation and workers: batched gathers for in-memory sets (persistent workers for
        training only), per-image decoding in persistent workers, into pinned memory on CUDA,
        for file-based sets."""
        if isinstance(data, FileImageSet):
            return {
                "num_workers": self.num_workers,
                "persistent_workers": self.num_workers > 0,
                "pin_memory": torch.cuda.is_available(),
            }
        return {
            "collate_fn": keep_batch,
            "num_workers": self.num_workers,
            "persistent_workers": train and self.num_workers > 0,
        }

    def _eval_loader(self, data: AnySet | None) -> DataLoader:
        if data is None:
            raise RuntimeError("call setup() before asking for evaluation data")
        return DataLoader(
            self._dataset(data, train=False),
            batch_size=self.eval_batch_size,
            shuffle=False,
            # its own seed for the workers: creating the iterator (Lightning does so on resume
            # where the uninterrupted run did not) leaves the global RNG of training alone
            generator=torch.Generator().manual_seed(self.split_seed),
            **self._loader_options(data, train=False),
        )

    def val_dataloader(self) -> DataLoader:
        if not self.has_validation:
            raise RuntimeError(
                f"{self.target_name} has no validation split (data.val_size=0 and data.cv_folds "
                f"is null): train with limit_val_batches=0, or set data.cv_folds (or "
                f"data.val_size > 0) to validate"
            )
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)

    # ------------------------------------------------------------------ on-device preprocessing
    def preprocess(self, domain: str, images: Tensor, train: bool) -> Tensor:
        """uint8 → [0, 1] → (augmentation when ``train``) → standardised, on the batch's device.

        Batches of file-based sets were transformed and normalised in the loader's workers
        (:func:`~lightning_stl.data.file_image_set.smile_transform`) and are returned as they are.
        """
        if isinstance(self.train_sets.get(domain), FileImageSet):
            return images
        normalize = self.normalize[domain]
        x = normalize.scale(images)
        if train and not self.augment[domain].is_identity:
            x = self.augment[domain](x)
        return normalize.standardize(x)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        training = self.trainer is not None and self.trainer.training
        if isinstance(batch, dict):
            return {
                domain: (self.preprocess(domain, x, train=training), y)
                for domain, (x, y) in batch.items()
            }
        x, y = batch
        return self.preprocess(TARGET, x, train=False), y


def _check_cv(cv_folds: Any, cv_fold: Any) -> tuple[int | None, int]:
    """``(cv_folds, cv_fold)`` after checking them; errors name the value and what is allowed.

    ``cv_fold=None`` means "every fold" to :func:`lightning_stl.run.train`, which builds one
    DataModule per fold; a DataModule itself is one fold.
    """
    if cv_fold is None and cv_folds is None:
        return None, 0
    if cv_fold is None:
        raise ValueError(
            f"data.cv_fold=null with data.cv_folds={cv_folds}: a DataModule holds one fold; "
            "choose cv_fold in 0..cv_folds-1 (lightning_stl.run trains every fold for null)"
        )
    if isinstance(cv_fold, bool) or not isinstance(cv_fold, int | np.integer):
        raise ValueError(f"data.cv_fold={cv_fold} is not allowed: it must be an integer or null")
    if cv_folds is None:
        if cv_fold != 0:
            raise ValueError(
                f"data.cv_fold={cv_fold} is not allowed without data.cv_folds: set data.cv_folds "
                f"(e.g. 3) to cross-validate, or leave cv_fold at 0"
            )
        return None, 0
    if isinstance(cv_folds, bool) or not isinstance(cv_folds, int | np.integer) or cv_folds < 2:
        raise ValueError(
            f"data.cv_folds={cv_folds} is not allowed: it must be null or an integer >= 2"
        )
    if not 0 <= cv_fold < cv_folds:
        raise ValueError(
            f"data.cv_fold={cv_fold} is not allowed: with data.cv_folds={cv_folds} it must lie "
            f"in [0, {cv_folds}), i.e. 0 to {cv_folds - 1}"
        )
    return int(cv_folds), int(cv_fold)


def _as_augment(
    value: BatchAugment | dict[str, Any] | None, default: BatchAugment, name: str
) -> BatchAugment:
    """``data.<name>``: null (the data set's default), a BatchAugment, or its settings."""
    if value is None:
        return default
    if isinstance(value, BatchAugment):
        return value
    settings = ", ".join(f.name for f in dataclasses.fields(BatchAugment))
    if not isinstance(value, dict):
        raise ValueError(
            f"data.{name}={value!r} is not allowed: it must be null (the data set's default) or "
            f"settings of the batch augmentation: {settings}"
        )
    unknown = sorted(set(value) - {f.name for f in dataclasses.fields(BatchAugment)})
    if unknown:
        raise ValueError(
            f"data.{name}.{unknown[0]} is not a setting of the batch augmentation; its "
            f"settings: {settings}"
        )
    return BatchAugment(**value)
