"""Source and target data: in-memory image sets, loaders by name, and the DataModule."""

from lightning_stl.data.augment import BatchAugment
from lightning_stl.data.datamodule import SourceTargetDataModule
from lightning_stl.data.errors import DatasetNotFoundError
from lightning_stl.data.image_set import ImageSet
from lightning_stl.data.registry import DATASETS, get_dataset

__all__ = [
    "DATASETS",
    "BatchAugment",
    "DatasetNotFoundError",
    "ImageSet",
    "SourceTargetDataModule",
    "get_dataset",
]
