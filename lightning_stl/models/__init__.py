"""Backbones: this project's architectures, registered in timm's model registry on import.

Importing this package registers ``resnet20``, ``resnet32``, ``resnet56`` (CIFAR ResNets),
``wrn10_2``, ``wrn16_4``, ``wrn28_10`` (Wide ResNets) and ``digits_cnn`` with
:func:`timm.models.register_model`, so that they and every timm model are built the same way:
``timm.create_model(name, ...)`` or, for a feature extractor, :func:`create_backbone`.
"""

from lightning_stl.models import digits_cnn, resnet_cifar, wide_resnet
from lightning_stl.models.digits_cnn import DigitsCNN
from lightning_stl.models.registry import (
    PretrainedFileError,
    create_backbone,
    list_backbones,
    load_pretrained_file,
)
from lightning_stl.models.resnet_cifar import CifarResNet
from lightning_stl.models.wide_resnet import WideResNet

__all__ = [
    "CifarResNet",
    "DigitsCNN",
    "PretrainedFileError",
    "WideResNet",
    "create_backbone",
    "digits_cnn",
    "list_backbones",
    "load_pretrained_file",
    "resnet_cifar",
    "wide_resnet",
]
