"""RegSL's self-labelling: label correction and loss re-weighting of the supervised loss.

Li & Zhang, "Improved Regularization and Robustness for Fine-tuning in Neural Networks",
NeurIPS 2021 (arXiv:2111.04578), "regularized self-labeling" (RegSL) = layer-wise distance
constraints (the :class:`~lightning_stl.callbacks.regsl_projection.RegSLProjection` callback)
+ self-labelling, the two parts of which transform the cross-entropy of a batch of B images with
logits z ``[B, K]``, probabilities p = softmax(z) and labels y ``[B]``:

Epochs are counted from 1, as the official trainer does (``base_trainer.py``: ``start_epoch = 1``;
``constraint_trainer.py``: ``if epoch >= self.correct_epoch`` and ``if epoch < self.adaptive_epoch``),
so with the defaults re-weighting starts in the 5th epoch and label correction in the 10th.
:meth:`RegSL.forward` turns the step's 0-based ``FineTuneStep.epoch`` into that count (``+ 1``).

* label correction (:func:`correct_labels`), from epoch ``correct_epoch`` on: an image whose
  label the model contradicts with confidence above the threshold is relabelled,

      ŷ_i = argmax_k p_ik   if max_k p_ik > threshold and argmax_k p_ik ≠ y_i,   else ŷ_i = y_i;

* loss re-weighting (:func:`loss_weights`), from epoch ``reweight_epoch`` on: with the per-image
  losses ℓ_i = CE(z_i, ŷ_i), the batch loss is Σ_i w_i ℓ_i / B with

      w_i = B · softmax(−ℓ / τ)_i   (weights detached, mean 1: low-loss images count more),

  the official code's Σ_i softmax(−ℓ/τ)_i ℓ_i written as a weighted mean. The temperature decays
  as in the official code, which sets ``temp = max(0.5, exp(−0.1·(e − A)))·τ₀`` at the end of
  every epoch e > A = ``reweight_epoch``, so that epoch e trains with
  τ(e) = τ₀ · max(0.5, exp(−0.1 · max(0, e − 1 − A)))  (:func:`reweight_temperature`).

Defaults from the official code (github.com/VirtuosoResearch/Regularized-Self-Labeling, README
commands): threshold 0.9, correct_epoch 10, reweight_epoch 5, τ₀ = 2 (of 30 epochs).

Difference from the official code: it keeps the corrected label of each training image (indexed
by the image's position in the data set) for the rest of training; this project's batches carry
no image indices, so a correction holds for the step that made it, and the image is corrected
again whenever the model is still that confident (it usually is: the same weights see it each
epoch).

Using it: :meth:`RegSL.supervised_loss` is the whole self-labelled cross-entropy. As a
:class:`~lightning_stl.regularizers.base.Regularizer` in ``method.module.regularizers``,
:meth:`RegSL.forward` returns ``supervised_loss − CE(z, y)``, so that FineTune's loss
``CE(z, y) + penalty`` *is* the self-labelled loss (``train/loss_regsl`` logs that difference);
it needs plain cross-entropy training (no mixup).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_stl.checks import integer, number
from lightning_stl.regularizers.base import FineTuneStep, Regularizer


def correct_labels(logits: Tensor, labels: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Self label-correction: ``(new_labels [B], changed [B] bool)`` for logits ``[B, K]`` and
    labels ``[B]``. A label changes to the model's prediction where the prediction differs from it
    with probability strictly above ``threshold``."""
    threshold = number("RegSL threshold", threshold, above=0, below=1)
    confidence, prediction = logits.detach().softmax(dim=1).max(dim=1)
    changed = (confidence > threshold) & (prediction != labels)
    return torch.where(changed, prediction, labels), changed


def loss_weights(losses: Tensor, temperature: float) -> Tensor:
    """Label re-weighting: ``B · softmax(−losses / τ)`` ``[B]`` for per-image losses ``[B]``,
    detached; the weights average 1 and decrease as the loss grows."""
    temperature = number("RegSL temperature", temperature, above=0)
    losses = losses.detach()
    return len(losses) * torch.softmax(-losses / temperature, dim=0)


def reweight_temperature(epoch: int, reweight_epoch: int, initial: float) -> float:
    """τ of the 1-based ``epoch``: τ₀ · max(0.5, exp(−0.1 · max(0, e − 1 − reweight_epoch))).

    The official code updates τ at the end of each epoch e > reweight_epoch, for the next one: τ₀
    in epochs up to reweight_epoch + 1, then decaying to τ₀/2.
    """
    return initial * max(0.5, math.exp(-0.1 * max(0, epoch - 1 - reweight_epoch)))


class RegSL(Regularizer):
    """RegSL's self-labelling of the supervised loss (label correction and re-weighting).

    Args:
        threshold: Confidence above which a contradicted label is corrected, in (0, 1).
        correct_epoch: First epoch of label correction, counted from 1 (the official code's
            count); ``None``: never.
        reweight_epoch: First epoch (from 1) of loss re-weighting; ``None``: never.
        temperature: τ₀ of the re-weighting, > 0.
    """

    name = "regsl"

    def __init__(
        self,
        threshold: float = 0.9,
        correct_epoch: int | None = 10,
        reweight_epoch: int | None = 5,
        temperature: float = 2.0,
    ):
        super().__init__()
        self.threshold = number("RegSL threshold", threshold, above=0, below=1)
        counted = (
            "null to switch the step off (epochs are counted from 1, as the official code does)"
        )
        self.correct_epoch = integer(
            "RegSL correct_epoch", correct_epoch, 1, null=True, also=counted
        )
        self.reweight_epoch = integer(
            "RegSL reweight_epoch", reweight_epoch, 1, null=True, also=counted
        )
        self.temperature = number("RegSL temperature", temperature, above=0)

    def self_label(self, logits: Tensor, labels: Tensor, epoch: int) -> tuple[Tensor, Tensor]:
        """``(labels [B], weights [B])`` to train on in the 1-based ``epoch``: corrected labels (from
        ``correct_epoch``) and per-image loss weights of mean 1 (all ones before
        ``reweight_epoch``)."""
        if self.correct_epoch is not None and epoch >= self.correct_epoch:
            labels, _ = correct_labels(logits, labels, self.threshold)
        if self.reweight_epoch is not None and epoch >= self.reweight_epoch:
            losses = F.cross_entropy(logits, labels, reduction="none")
            temperature = reweight_temperature(epoch, self.reweight_epoch, self.temperature)
            return labels, loss_weights(losses, temperature)
        return labels, torch.ones(len(labels), dtype=logits.dtype, device=logits.device)

    def supervised_loss(self, logits: Tensor, labels: Tensor, epoch: int) -> Tensor:
        """mean_i w_i · CE(z_i, ŷ_i): the self-labelled cross-entropy of logits ``[B, K]`` in the
        1-based ``epoch``."""
        labels, weights = self.self_label(logits, labels, epoch)
        return (weights * F.cross_entropy(logits, labels, reduction="none")).mean()

    def forward(self, step: FineTuneStep) -> Tensor:
        if step.pairs is not None:
            raise ValueError(
                "RegSL's self-labelling replaces the plain cross-entropy; it does not combine with "
                "mixup: set method.module.mixup_alpha=null"
            )
        epoch = step.epoch + 1  # the official trainer counts epochs from 1
        self_labelled = self.supervised_loss(step.logits, step.labels, epoch)
        return self_labelled - F.cross_entropy(step.logits, step.labels)
