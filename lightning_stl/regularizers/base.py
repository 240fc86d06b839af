"""What a fine-tuning regulariser is handed, and the interface every regulariser implements.

A regulariser (tllib's pattern, ``tllib/regularization/``) is a small ``nn.Module`` in its own
file. Whoever fine-tunes (:class:`~lightning_stl.methods.FineTune`, or a test with a bare
``nn.Module``) calls, for each regulariser:

* :meth:`Regularizer.setup` once before training with a :class:`FineTuneSetup`: the student's
  backbone and heads, the frozen pre-trained backbone ω⁰ (one snapshot every user shares) and the
  target training images. A regulariser snapshots nothing itself: L2-SP reads ω⁰, DELTA hooks its
  layers and estimates channel weights on the images, Co-Tuning learns a category relationship;
* :meth:`Regularizer.forward` every step with that step's tensors (:class:`FineTuneStep`),
  returning a scalar penalty that is added to the loss (already multiplied by its own weight).

A regulariser never sees a LightningModule, a Trainer or a DataModule. Things that act on
training time rather than on the loss (RIFLE's re-initialisation, RegSL's projection) are
callbacks in :mod:`lightning_stl.callbacks`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_stl.regularizers.mixup import MixupPairs

#: ``target_images(device)``: the target training images with the evaluation transform, in a
#: fixed order, as batches ``(x [B, C, H, W], y [B])`` on ``device``.
TargetImages = Callable[[torch.device], Iterable[tuple[Tensor, Tensor]]]


def pretrained_snapshot(backbone: nn.Module) -> nn.Module:
    """ω⁰: a deep copy of ``backbone`` with ``requires_grad=False``, in eval mode. Take it before
    any regulariser hooks ``backbone`` (the copy would carry the hooks); load the pre-trained
    weights into it with ``load_state_dict`` rather than copying again."""
    snapshot = copy.deepcopy(backbone)
    snapshot.requires_grad_(False)
    return snapshot.eval()


@dataclass(frozen=True)
class FineTuneSetup:
    """What a regulariser is handed once, before training (plain modules and tensors).

    ``backbone`` is the student's backbone (pre-trained weights loaded), its ``forward_features``
    / ``forward_head(pre_logits=True)`` give the step's maps and features; ``head`` the new target
    head ``nn.Linear(F, K_T)``; ``pretrained`` the frozen pre-trained backbone ω⁰ (a copy of
    ``backbone`` at set-up, ``requires_grad=False``, eval mode), shared by every regulariser and
    never trained; ``source_head`` the auxiliary head over the K_S source classes loaded from the
    pre-trained classifier (or ``None``); ``target_images`` the target training set
    (:data:`TargetImages`), with ``num_target_images`` images, and ``data_key()``, a string that
    changes whenever those images (or their transform) change, for caches of what is computed
    from them (computed when asked: it reads every image).
    """

    backbone: nn.Module
    head: nn.Linear
    pretrained: nn.Module | None = None
    source_head: nn.Linear | None = None
    target_images: TargetImages | None = None
    num_target_images: int = 0
    data_key: Callable[[], str] = str

    @property
    def num_target_classes(self) -> int:
        """K_T, outputs of the target head."""
        return int(self.head.out_features)


@dataclass
class FineTuneStep:
    """The tensors of one fine-tuning step (shapes for a batch of B images).

    ``inputs`` are the images the student saw ``[B, C, H, W]`` (mixed when mixup is on);
    ``clean_inputs`` the batch before mixing; ``labels`` ``[B]`` int64; ``feature_map`` the
    student's pre-pooling map ``[B, C', h, w]`` (or ``None`` for a backbone without one);
    ``features`` its pooled features ``[B, F]``; ``logits`` the target head's output ``[B, K_T]``;
    ``pairs`` the mixup draw (λ and π), ``None`` without mixup; ``epoch`` the 0-based epoch.
    """

    inputs: Tensor
    clean_inputs: Tensor
    labels: Tensor
    feature_map: Tensor | None
    features: Tensor
    logits: Tensor
    pairs: MixupPairs | None = None
    epoch: int = 0


class Regularizer(nn.Module):
    """Base class: ``setup(FineTuneSetup)`` once, then ``forward(FineTuneStep) -> Tensor``."""

    #: the name its penalty is logged under (``train/loss_<name>``)
    name: str = "regularizer"
    #: whether it trains the auxiliary source-class head (the fine-tuner must then create it)
    uses_source_head: bool = False
    #: whether it reads the frozen pre-trained backbone ω⁰ (the fine-tuner must then keep one)
    uses_pretrained: bool = False

    def __init__(self) -> None:
        super().__init__()
        # A plain attribute, not a sub-module: the student's modules it refers to stay out of
        # the regulariser's parameters and state_dict (they belong to the fine-tuned model).
        self.context: FineTuneSetup | None = None

    def setup(self, setup: FineTuneSetup) -> None:
        """Keep what it needs of ``setup`` (default: the set-up itself, as :attr:`context`)."""
        self.context = setup

    def require_pretrained(self) -> nn.Module:
        """The set-up's ω⁰, or one clear error."""
        pretrained = self.require_setup().pretrained
        if pretrained is None:
            raise RuntimeError(
                f"{type(self).__name__} reads the pre-trained backbone, but the set-up has none "
                "(set uses_pretrained = True on the class so that the fine-tuner keeps one)"
            )
        return pretrained

    def require_setup(self) -> FineTuneSetup:
        """:attr:`context`, or one clear error when :meth:`setup` has not run."""
        if self.context is None:
            raise RuntimeError(
                f"{type(self).__name__} is not set up: call setup(FineTuneSetup(...)) before "
                "training (FineTune.setup_regularizers does)"
            )
        return self.context

    def forward(self, step: FineTuneStep) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def at_least_float32(tensor: Tensor) -> Tensor:
    """``tensor`` in float32 if it is a half-precision one (bf16 autocast), else unchanged
    (float64 stays float64): losses sum many terms and need float32's digits."""
    return tensor.float() if tensor.is_floating_point() and tensor.element_size() < 4 else tensor
