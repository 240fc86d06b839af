"""The :class:`~lightning_stl.regularizers.FineTuneSetup` of a fine-tuned model and its data.

The one place where the DataModule meets the regularisers: its target training set becomes the
``target_images`` they may read once (evaluation transform, fixed order, on a chosen device) and
the ``data_key`` their caches are named by; the regularisers themselves never see it.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn

from lightning_stl.regularizers import FineTuneSetup
from lightning_stl.regularizers.delta_channels import tensor_bytes
from lightning_stl.schedule import TARGET


def fine_tune_setup(
    backbone: nn.Module,
    head: nn.Linear,
    pretrained: nn.Module | None,
    source_head: nn.Linear | None,
    datamodule: Any,
) -> FineTuneSetup:
    """The set-up of ``backbone``, its heads and pre-trained snapshot on ``datamodule``'s target
    training set (``datamodule.setup("fit")`` is called when it has not run; ``None``: no
    images, for regularisers that need none)."""
    if datamodule is None:
        return FineTuneSetup(backbone, head, pretrained, source_head)
    if getattr(datamodule, "train_sets", None) is None or TARGET not in datamodule.train_sets:
        datamodule.setup("fit")
    data = datamodule.train_sets[TARGET]

    def target_images(device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
        for batch in datamodule.target_loader("train"):
            yield datamodule.on_after_batch_transfer(move_data_to_device(batch, device), 0)

    return FineTuneSetup(
        backbone=backbone,
        head=head,
        pretrained=pretrained,
        source_head=source_head,
        target_images=target_images,
        num_target_images=len(data),
        data_key=functools.partial(data_key, datamodule, data),
    )


def data_key(datamodule: Any, data: Any) -> str:
    """A digest of the training set's size, labels and images (pixels, or file names) and of the
    evaluation transform that decodes file-based sets (resize, crop, aspect); ``""`` (nothing to
    cache under) for a set without ``labels``."""
    if getattr(data, "labels", None) is None:
        return ""
    digest = hashlib.sha256()
    transform = tuple(
        getattr(datamodule, name, None) for name in ("resize_size", "crop_size", "keep_aspect")
    )
    digest.update(f"transform{transform!r}".encode())
    labels = torch.as_tensor(data.labels)
    digest.update(f"n={len(labels)}".encode())
    digest.update(tensor_bytes(labels.long()))
    images = getattr(data, "images", None)
    if isinstance(images, Tensor):
        digest.update(f"images{tuple(images.shape)}{images.dtype}".encode())
        digest.update(tensor_bytes(images))
    files = getattr(data, "files", None)
    if files is not None:
        digest.update("\n".join(str(f) for f in np.asarray(files).tolist()).encode())
    return digest.hexdigest()
