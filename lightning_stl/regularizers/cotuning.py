"""Co-Tuning: fine-tune the pre-trained source classifier too, against translated target labels.

You, Kou, Jiang, Wang, Long, "Co-Tuning for Transfer Learning", NeurIPS 2020. The pre-trained
model's source classifier z_s (K_S source classes, e.g. ImageNet's 1,000) is kept and fine-tuned
jointly with the backbone and the new target head. Its training signal comes from the target
labels translated into source-class distributions by a category relationship

    p(y_s | y_t)  ``[K_T, K_S]``  (each row a distribution over the K_S source classes),

learned once, before fine-tuning, from the pre-trained model's source-class probabilities
q(x) = softmax(z_s(g(x)) · logit_scale) ``[N, K_S]`` on the N target training images. The loss is

    L = CE(h(g(x)), y_t) + trade_off · L_Co,
    L_Co = −1/B Σ_i Σ_s p(y_s = s | y_t = y_i) · log softmax(z_s(g(x_i)))_s       (this ``forward``)

(a cross-entropy of the source head against the soft "source label" of each image, as the
official code's ``imagenet_loss`` and tllib's ``CoTuningLoss`` compute it). With mixup on, the
soft labels are mixed with the batch's λ and π like the inputs.

Two ways to learn p(y_s | y_t) (:func:`direct_relationship`, :func:`reverse_relationship`):

* ``"direct"``: the mean of q over the training images of each target class,
  p(y_s | y_t = c) = mean_{i: y_i = c} q(x_i). tllib's ``Relationship`` implements only this one.
* ``"reverse"`` (the paper's default, the official code's ``relationship_learning``): fit a
  multinomial logistic regression without intercept from q(x) to y_t, choosing its inverse
  regularisation C from the official grid 1e4 ... 1e-4 by accuracy on held-out images, calibrate
  a temperature on them (NLL, LBFGS), which gives p(y_t | y_s = s) = softmax_t(scale · W[:, s]),
  and turn it around with Bayes' rule and the source marginal p(y_s) = mean_i q(x_i):
  p(y_s | y_t) ∝ p(y_t | y_s) p(y_s), rows normalised.

  The official code holds out the data set's validation split; this project holds out a
  stratified ``holdout_fraction`` of the training images (seeded by ``seed``) so that no
  validation label is used for training. When some class has fewer than two training images no
  split is possible: C = 1 (scikit-learn's default), no calibration, fitted on all images.

``logit_scale`` multiplies the source logits before the softmax; the official code uses 0.884
(the temperature of its ImageNet ResNet-50), tllib 1.

State: the fine-tuned source classifier z_s is FineTune's ``source_head`` (``nn.Linear(F, K_S)``),
which FineTune creates for a regulariser with ``uses_source_head = True``, loads with the
pre-trained classifier (``load_source_model``), trains (``student_parameters``) and saves in its
checkpoints, sized by the ``num_source_classes`` it is built with. With SMILE's γ_FC > 0 the same
head is SMILE's auxiliary head: both losses fine-tune the one pre-trained classifier. The
relationship is derived from the source model and recomputed by every setup, so it is a
non-persistent buffer (``state_dict`` does not change with setup).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_stl.checks import choice, number
from lightning_stl.regularizers.base import (
    FineTuneSetup,
    FineTuneStep,
    Regularizer,
    at_least_float32,
)

log = logging.getLogger(__name__)

METHODS = ("reverse", "direct")
#: The official code's grid of the logistic regression's inverse regularisation C.
OFFICIAL_C_GRID = (
    1e4, 3e3, 1e3, 3e2, 1e2, 3e1, 1e1, 3.0, 1.0, 3e-1, 1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4,
)  # fmt: skip


# ---------------------------------------------------------------------- the relationship
def _check_inputs(probabilities: Tensor, labels: Tensor, num_target_classes: int) -> None:
    if probabilities.ndim != 2 or labels.shape != (probabilities.shape[0],):
        raise ValueError(
            f"source probabilities must be [N, K_S] and labels [N], got "
            f"{list(probabilities.shape)} and {list(labels.shape)}"
        )
    counts = torch.bincount(labels.long(), minlength=num_target_classes)
    if len(counts) > num_target_classes:
        raise ValueError(
            f"labels go up to {int(labels.max())}, but there are {num_target_classes} target "
            "classes"
        )
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        raise ValueError(
            f"Co-Tuning learns p(y_s | y_t) from the training images of each target class, but "
            f"target classes {empty} have none"
        )


def direct_relationship(probabilities: Tensor, labels: Tensor, num_target_classes: int) -> Tensor:
    """The direct approach: row c is the mean of the source probabilities ``[N, K_S]`` of the
    images with label c (``labels`` ``[N]``). Returns ``[K_T, K_S]`` float64, rows summing to 1."""
    _check_inputs(probabilities, labels, num_target_classes)
    probabilities = probabilities.double()
    sums = torch.zeros(num_target_classes, probabilities.shape[1], dtype=torch.float64)
    sums.index_add_(0, labels.long(), probabilities)
    counts = torch.bincount(labels.long(), minlength=num_target_classes).double()
    return sums / counts[:, None]


def calibrate_scale(logits: Tensor, labels: Tensor) -> float:
    """The temperature-like scale t > 0 minimising the NLL of ``softmax(t · logits)``
    (the official code's ``calibrate``), by LBFGS from t = 1."""
    logits, labels = logits.double(), labels.long()
    scale = torch.ones((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([scale], max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits * scale, labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    value = float(scale.detach())
    return value if np.isfinite(value) and value > 0 else 1.0


def _coefficients(classifier: Any, num_target_classes: int) -> np.ndarray:
    """``[K_T, K_S]`` logit weights of a fitted scikit-learn logistic regression (its binary form
    has one row: class 1 against class 0, whose logit is 0)."""
    coef = np.asarray(classifier.coef_, dtype=np.float64)
    if num_target_classes == 2 and coef.shape[0] == 1:
        coef = np.concatenate([np.zeros_like(coef), coef])
    return coef


def reverse_relationship(
    probabilities: Tensor,
    labels: Tensor,
    num_target_classes: int,
    c_grid: Sequence[float] = OFFICIAL_C_GRID,
    holdout_fraction: float = 0.2,
    seed: int = 0,
) -> Tensor:
    """The reverse approach (the official ``relationship_learning``), see the module docstring.

    ``probabilities`` ``[N, K_S]`` source-class probabilities of the training images, ``labels``
    ``[N]`` their target labels. Returns p(y_s | y_t) ``[K_T, K_S]`` float64, rows summing to 1.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    _check_inputs(probabilities, labels, num_target_classes)
    q = probabilities.double().numpy()
    y = labels.long().numpy()
    counts = np.bincount(y, minlength=num_target_classes)
    held = round(holdout_fraction * len(y))
    splittable = (
        holdout_fraction > 0
        and counts.min() >= 2
        and num_target_classes <= held <= len(y) - num_target_classes
    )
    if splittable:
        fit_idx, held_idx = train_test_split(
            np.arange(len(y)), test_size=held, stratify=y, random_state=seed
        )
        best, best_acc = None, -1.0
        for c in c_grid:  # the first best C, as np.argmax in the official code
            candidate = LogisticRegression(C=float(c), fit_intercept=False)
            candidate.fit(q[fit_idx], y[fit_idx])
            acc = float(np.mean(candidate.predict(q[held_idx]) == y[held_idx]))
            if acc > best_acc:
                best, best_acc = candidate, acc
        coef = _coefficients(best, num_target_classes)
        held_logits = torch.from_numpy(q[held_idx] @ coef.T)
        scale = calibrate_scale(held_logits, torch.from_numpy(y[held_idx]))
        log.info(
            "Co-Tuning relationship: C=%g (held-out accuracy %.3f), calibrated scale %.3f",
            best.C,
            best_acc,
            scale,
        )
    else:
        log.warning(
            "Co-Tuning relationship: %d training images in %d classes (fewest %d per class) are "
            "too few to hold out %.0f%% for choosing C; fitting C=1 on all of them, uncalibrated",
            len(y),
            num_target_classes,
            int(counts.min()),
            100 * holdout_fraction,
        )
        classifier = LogisticRegression(C=1.0, fit_intercept=False)
        classifier.fit(q, y)
        coef, scale = _coefficients(classifier, num_target_classes), 1.0
    target_given_source = torch.from_numpy(coef.T * scale).softmax(dim=1)  # [K_S, K_T]
    source_marginal = torch.from_numpy(q.mean(axis=0))  # [K_S]
    joint = (target_given_source * source_marginal[:, None]).T  # [K_T, K_S]
    return joint / joint.sum(dim=1, keepdim=True)


# ---------------------------------------------------------------------- the source classifier
def source_probabilities(
    backbone: nn.Module,
    weight: Tensor,
    bias: Tensor,
    batches: Iterable[tuple[Tensor, Tensor]],
    logit_scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """q(x) = softmax(logit_scale · (W g(x) + b)) ``[N, K_S]`` (float64, CPU) and the labels
    ``[N]`` of every batch ``(x [B, C, H, W], y [B])``, with the pooled features g = ``backbone(x)``
    ``[B, F]`` in eval mode."""
    was_training = backbone.training
    backbone.eval()
    probabilities, labels = [], []
    try:
        with torch.no_grad():
            for x, y in batches:
                logits = F.linear(backbone(x), weight, bias)
                probabilities.append((logits.double() * logit_scale).softmax(dim=1).cpu())
                labels.append(y.cpu())
    finally:
        backbone.train(was_training)
    return torch.cat(probabilities), torch.cat(labels)


# ---------------------------------------------------------------------- the regulariser
class CoTuning(Regularizer):
    """trade_off · L_Co: the source classifier's cross-entropy against p(y_s | y_t = y).

    ``forward(step)`` takes ``step.features`` ``[B, F]`` and ``step.labels`` ``[B]`` and
    returns the scalar trade_off · mean_i (−Σ_s r_{y_i, s} · log softmax(z_s(f_i))_s) with r the
    relationship ``[K_T, K_S]`` (mixed with the step's λ and π under mixup).

    Args:
        trade_off: Weight of L_Co, ≥ 0. Default 2.3, the official code's ``--trade_off``.
        method: ``"reverse"`` (the paper's default) or ``"direct"``.
        logit_scale: Multiplies the source logits before the softmax that gives q(x) (official
            code: 0.884 for its ImageNet ResNet-50; tllib: 1).
        holdout_fraction: Share of the training images held out to choose C and calibrate
            (``"reverse"`` only), in [0, 1).
        c_grid: Values of C tried (``"reverse"``), the official grid by default.
        seed: Seed of the held-out split.

    The source classifier is the module's ``source_head`` (see the module docstring), trained
    with the backbone's learning rate, as in the official code.
    """

    name = "cotuning"
    uses_pretrained = True
    #: FineTune gives the module a ``source_head`` initialised from the pre-trained classifier
    uses_source_head = True

    def __init__(
        self,
        trade_off: float = 2.3,
        method: str = "reverse",
        logit_scale: float = 1.0,
        holdout_fraction: float = 0.2,
        c_grid: Sequence[float] = OFFICIAL_C_GRID,
        seed: int = 0,
    ):
        super().__init__()
        self.trade_off = number("Co-Tuning trade_off", trade_off, at_least=0)
        self.method = choice("Co-Tuning method", method, METHODS)
        self.logit_scale = number("Co-Tuning logit_scale", logit_scale, above=0)
        self.holdout_fraction = number(
            "Co-Tuning holdout_fraction", holdout_fraction, at_least=0, below=1
        )
        grid = [c for c in c_grid if not isinstance(c, bool) and isinstance(c, int | float)]
        if not grid or len(grid) != len(c_grid) or not all(0 < c < float("inf") for c in grid):
            raise ValueError(
                f"Co-Tuning c_grid={list(c_grid)} is not allowed: it must be a non-empty list of "
                "finite numbers > 0"
            )
        self.c_grid = tuple(float(c) for c in grid)
        self.seed = int(seed)
        self.register_buffer("relationship", torch.empty(0), persistent=False)

    def setup(self, setup: FineTuneSetup) -> None:
        """Learn p(y_s | y_t) with the pre-trained source classifier (the ``source_head`` as
        loaded, before any training) on the target training images (evaluation transform, the
        pre-trained backbone in eval mode)."""
        if setup.source_head is None:
            raise ValueError(
                "Co-Tuning fine-tunes the pre-trained source classifier, but the set-up has no "
                "source_head: FineTune creates it for a regulariser with uses_source_head=True "
                "when it is built with num_source_classes (the source model's classifier)"
            )
        if setup.target_images is None:
            raise ValueError("Co-Tuning learns its relationship on the target training images")
        super().setup(setup)
        weight, bias = setup.source_head.weight.detach(), setup.source_head.bias.detach()
        batches = setup.target_images(weight.device)
        probabilities, labels = source_probabilities(
            self.require_pretrained(), weight, bias, batches, self.logit_scale
        )
        self.relationship = self.learn_relationship(
            probabilities, labels, setup.num_target_classes
        ).to(device=weight.device, dtype=weight.dtype)

    def learn_relationship(
        self, probabilities: Tensor, labels: Tensor, num_target_classes: int
    ) -> Tensor:
        """p(y_s | y_t) ``[K_T, K_S]`` from source probabilities ``[N, K_S]`` and labels ``[N]``."""
        if self.method == "direct":
            return direct_relationship(probabilities, labels, num_target_classes)
        return reverse_relationship(
            probabilities,
            labels,
            num_target_classes,
            self.c_grid,
            self.holdout_fraction,
            self.seed,
        )

    def forward(self, step: FineTuneStep) -> Tensor:
        source_head = self.require_setup().source_head
        source_logits = source_head(step.features)
        soft_labels = self.relationship[step.labels]
        if step.pairs is not None:
            soft_labels = step.pairs.mix(soft_labels)
        loss = (
            -(soft_labels * F.log_softmax(at_least_float32(source_logits), dim=1)).sum(dim=1).mean()
        )
        return self.trade_off * loss
