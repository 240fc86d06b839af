"""What a fine-tuning regulariser sees, and the interface every regulariser implements.

A regulariser (tllib's pattern, ``tllib/regularization/``) is a small ``nn.Module`` in its own
file. :class:`~lightning_stl.methods.FineTune` calls, for each one in ``method.module.regularizers``:

* :meth:`Regularizer.setup` once before training, with the module (its backbone and head already
  initialised from the source model) and the set-up DataModule — to snapshot the pre-trained
  weights (L2-SP), estimate channel weights (DELTA), learn a category relationship (Co-Tuning);
* :meth:`Regularizer.forward` every step with the :class:`FineTuneStep` of that step, returning a
  scalar penalty that is added to the loss (already multiplied by the regulariser's own weight).

Things that act on training time rather than on the loss (RIFLE's re-initialisation, RegSL's
projection) are callbacks in :mod:`lightning_stl.callbacks`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from lightning_stl.regularizers.mixup import MixupPairs

if TYPE_CHECKING:  # pragma: no cover
    from lightning_stl.methods.finetune import FineTune


@dataclass
class FineTuneStep:
    """The tensors of one fine-tuning step (shapes for a batch of B images).

    ``inputs`` are the images the student saw ``[B, C, H, W]`` (mixed when mixup is on);
    ``clean_inputs`` the batch before mixing; ``labels`` ``[B]`` int64; ``feature_map`` the
    student's pre-pooling map ``[B, C', h, w]`` (or ``None`` for a backbone without one);
    ``features`` its pooled features ``[B, F]``; ``logits`` the target head's output ``[B, K_T]``;
    ``pairs`` the mixup draw (λ and π), ``None`` without mixup.
    """

    inputs: Tensor
    clean_inputs: Tensor
    labels: Tensor
    feature_map: Tensor | None
    features: Tensor
    logits: Tensor
    pairs: MixupPairs | None


class Regularizer(nn.Module):
    """Base class: ``setup(module, datamodule)`` once, then ``forward(step, module) -> Tensor``."""

    #: the name its penalty is logged under (``train/loss_<name>``)
    name: str = "regularizer"

    def setup(self, module: FineTune, datamodule: Any) -> None:
        """Prepare before training (default: nothing)."""

    def forward(self, step: FineTuneStep, module: FineTune) -> Tensor:  # pragma: no cover
        raise NotImplementedError
