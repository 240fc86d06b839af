"""Source and target data: in-memory and file-based image sets, loaders by name, sampling
protocols, and the DataModule."""

from lightning_stl.data.augment import BatchAugment
from lightning_stl.data.datamodule import SourceTargetDataModule
from lightning_stl.data.errors import DatasetNotFoundError
from lightning_stl.data.file_image_set import FileImageDataset, FileImageSet, smile_transform
from lightning_stl.data.fine_grained import (
    FINE_GRAINED_LOADERS,
    load_cub200,
    load_fgvc_aircraft,
    load_food101,
    load_mit_indoor67,
    load_stanford_cars,
)
from lightning_stl.data.image_set import ImageSet
from lightning_stl.data.protocols import SamplingProtocol, parse_protocol
from lightning_stl.data.registry import DATASETS, get_dataset

__all__ = [
    "DATASETS",
    "FINE_GRAINED_LOADERS",
    "BatchAugment",
    "DatasetNotFoundError",
    "FileImageDataset",
    "FileImageSet",
    "ImageSet",
    "SamplingProtocol",
    "SourceTargetDataModule",
    "get_dataset",
    "load_cub200",
    "load_fgvc_aircraft",
    "load_food101",
    "load_mit_indoor67",
    "load_stanford_cars",
    "parse_protocol",
    "smile_transform",
]
