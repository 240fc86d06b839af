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

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_stl.checks import choice, integer
from lightning_stl.data import loaders
from lightning_stl.data.augment import BatchAugment, Normalize, as_augment
from lightning_stl.data.file_image_set import FileImageSet, smile_transform
from lightning_stl.data.image_set import ImageSet
from lightning_stl.data.loaders import AnySet
from lightning_stl.data.protocols import SamplingProtocol, parse_protocol
from lightning_stl.data.registry import get_dataset
from lightning_stl.data.streams import ResumableLoader
from lightning_stl.data.target_splits import (
    check_cv,
    check_target_size,
    held_out_size,
    split_target,
)
from lightning_stl.schedule import SOURCE, TARGET

EPOCH_BASES = (SOURCE, TARGET)


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
        integer("data.num_workers", num_workers, low=0)
        self.target_name, self.source_name = target, source
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(
                f"data.root={self.root} is not a folder but a file (data.root is "
                "paths.data_dir, which $LIGHTNING_STL_DATA sets): point it at the data folder"
            )
        self.download = bool(download)
        self.target_size = target_size
        integer("data.val_size", val_size, low=0, null=True, also="null (the data set's own)")
        self.protocol = parse_protocol(protocol)
        if self.protocol is not None and target_size is not None:
            raise ValueError(
                f"data.protocol={self.protocol.name!r} and data.target_size={target_size} both "
                f"choose the training images; set one of them to null"
            )
        self.cv_folds, self.cv_fold = check_cv(cv_folds, cv_fold)
        self.val_size = held_out_size(val_size, self.cv_folds, self.target_spec.val_size)
        check_target_size(target_size, self.val_size, self.target_spec.train_size, target)
        self.batch_size = {TARGET: target_batch_size, SOURCE: source_batch_size}
        self.eval_batch_size = eval_batch_size
        self.split_seed, self.subset_seed = int(split_seed), int(subset_seed)
        self.options = {TARGET: dict(target_options or {}), SOURCE: dict(source_options or {})}
        source_default = self.source_spec.augment if self.source_spec else BatchAugment()
        self.augment = {
            TARGET: as_augment(target_augment, self.target_spec.augment, "target_augment"),
            SOURCE: as_augment(source_augment, source_default, "source_augment"),
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
        choice("epoch_basis", epoch_basis, EPOCH_BASES)
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
        splits = split_target(
            target["train"],
            target["test"],
            name=self.target_name,
            val_size=self.val_size,
            split_seed=self.split_seed,
            subset_seed=self.subset_seed,
            target_size=self.target_size,
            protocol=self.protocol,
            cv_folds=self.cv_folds,
            cv_fold=self.cv_fold,
        )
        self.target_class_ids = splits.class_ids
        self.train_sets[TARGET], self.val_set, self.test_set = splits.train, splits.val, splits.test
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
        connector = getattr(self.trainer, "_accelerator_connector", None)  # private: no public one
        if world > 1 and getattr(connector, "use_distributed_sampler", False):
            raise ValueError(
                f"trainer.use_distributed_sampler=true with {world} processes: each process "
                "draws its own stream of sub-batches here, and Lightning's distributed sampler "
                "would replace it; use trainer=ddp (it sets use_distributed_sampler: false)"
            )
        seed = self.stream_seed
        if seed is None:  # not chosen by configure_training: from the seeded global RNG
            seed = self.stream_seed = int(torch.randint(0, 2**62, ()))
        positions, self._resume_positions = self._resume_positions, None
        self._train_loaders = loaders.stream_loaders(
            {domain: self.train_sets[domain] for domain in self.train_domains},
            self.batch_size,
            steps,
            seed,
            first_stream=len(EPOCH_BASES) * rank,
            transform=self.transforms[True],
            num_workers=self.num_workers,
            positions=positions,
        )
        return CombinedLoader(self._train_loaders, mode="min_size")

    def state_dict(self) -> dict[str, Any]:
        """Where each training stream of the running fit is (saved in checkpoints by Lightning).

        Lightning also asks the loaders themselves, but gives their states back only when the
        fit loop builds its loader after the restore, and it is built before, when
        ``configure_optimizers`` asks for ``estimated_stepping_batches``; the DataModule's state
        is restored first, so the loader built then starts where the checkpoint was."""
        return {"streams": {d: loader.state_dict() for d, loader in self._train_loaders.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue these streams in a fit's next :meth:`train_dataloader` (not after a test)."""
        if self.trainer is not None and self.trainer.state.fn not in (None, "fit"):
            return
        self._resume_positions = dict(state_dict["streams"]) if state_dict.get("streams") else None

    def eval_loader(self, data: AnySet | None) -> DataLoader:
        """One pass through ``data``, in order, without augmentation."""
        if data is None:
            raise RuntimeError("call setup() before asking for evaluation data")
        return loaders.eval_loader(
            data, self.transforms[False], self.eval_batch_size, self.num_workers, self.split_seed
        )

    def val_dataloader(self) -> DataLoader:
        if not self.has_validation:
            raise RuntimeError(
                f"{self.target_name} has no validation split (data.val_size=0 and data.cv_folds "
                f"is null): train with limit_val_batches=0, or set data.cv_folds (or "
                f"data.val_size > 0) to validate"
            )
        return self.eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self.eval_loader(self.test_set)

    def target_loader(self, split: str) -> DataLoader:
        """An evaluation loader (no augmentation, no shuffle) over the target's training images
        (``"train"``; :meth:`setup` runs first where it has not) or its test set (``"test"``);
        its batches go through :meth:`on_after_batch_transfer`."""
        choice("split", split, ("train", "test"))
        if split == "test":
            return self.test_dataloader()
        if not self.train_sets:
            self.setup("fit")
        return self.eval_loader(self.train_sets[TARGET])

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
