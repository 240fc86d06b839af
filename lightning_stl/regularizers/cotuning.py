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
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn

from lightning_stl.interpolation import split_loader
from lightning_stl.regularizers.base import FineTuneStep, Regularizer
from lightning_stl.regularizers.smile import check_loss_weight

if TYPE_CHECKING:  # pragma: no cover
    from lightning_stl.methods.finetune import FineTune

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
def pretrained_classifier(module: nn.Module) -> tuple[Tensor, Tensor]:
    """The pre-trained source classifier ``(weight [K_S, F], bias [K_S])`` of a module about to be
    fine-tuned: the classifier of its ``source_model`` (kept by ``FineTune.load_source_model``),
    else its ``source_head`` (loaded from that classifier, not trained yet at setup)."""
    source = getattr(module, "source_model", None)
    classifier = getattr(source, "classifier", None)
    if classifier is not None:
        return classifier["weight"].detach(), classifier["bias"].detach()
    head = getattr(module, "source_head", None)
    if isinstance(head, nn.Linear):
        return head.weight.detach(), head.bias.detach()
    raise ValueError(
        f"Co-Tuning needs the pre-trained source classifier, but {type(module).__name__} has no "
        "source_model with a classifier and no source_head. Give backbone.weights a file or "
        "checkpoint with its classifier, or use another method"
    )


def source_probabilities(
    module: nn.Module,
    weight: Tensor,
    bias: Tensor,
    loader: Any,
    preprocess: Callable[[Any], tuple[Tensor, Tensor]],
    logit_scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """q(x) = softmax(logit_scale · (W g(x) + b)) ``[N, K_S]`` (float64, CPU) and the labels
    ``[N]`` of every batch of ``loader``, with the module's features ``g`` in eval mode."""
    device = weight.device
    was_training = module.training
    module.eval()
    probabilities, labels = [], []
    try:
        with torch.no_grad():
            for batch in loader:
                x, y = preprocess(move_data_to_device(batch, device))
                logits = F.linear(module.extract_features(x), weight, bias)
                probabilities.append((logits.double() * logit_scale).softmax(dim=1).cpu())
                labels.append(y.cpu())
    finally:
        module.train(was_training)
    return torch.cat(probabilities), torch.cat(labels)


# ---------------------------------------------------------------------- the regulariser
class CoTuning(Regularizer):
    """trade_off · L_Co: the source classifier's cross-entropy against p(y_s | y_t = y).

    ``forward(step, module)`` takes ``step.features`` ``[B, F]`` and ``step.labels`` ``[B]`` and
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
        self.trade_off = check_loss_weight("Co-Tuning trade_off", trade_off)
        if method not in METHODS:
            raise ValueError(
                f"Co-Tuning method={method!r} is not allowed: choose one of {', '.join(METHODS)}"
            )
        self.method = method
        if (
            isinstance(logit_scale, bool)
            or not isinstance(logit_scale, int | float)
            or not 0 < logit_scale < float("inf")
        ):
            raise ValueError(
                f"Co-Tuning logit_scale={logit_scale!r} is not allowed: it must be a finite "
                "number > 0"
            )
        self.logit_scale = float(logit_scale)
        if (
            isinstance(holdout_fraction, bool)
            or not isinstance(holdout_fraction, int | float)
            or not 0 <= holdout_fraction < 1
        ):
            raise ValueError(
                f"Co-Tuning holdout_fraction={holdout_fraction!r} is not allowed: it must lie in "
                "[0, 1)"
            )
        self.holdout_fraction = float(holdout_fraction)
        c_grid = tuple(float(c) for c in c_grid)
        if not c_grid or not all(c > 0 for c in c_grid):
            raise ValueError(
                f"Co-Tuning c_grid={list(c_grid)} is not allowed: it must be a non-empty list of "
                "numbers > 0"
            )
        self.c_grid = c_grid
        self.seed = int(seed)
        self.register_buffer("relationship", torch.empty(0), persistent=False)

    def setup(self, module: FineTune, datamodule: Any) -> None:
        """Learn p(y_s | y_t) with the pre-trained source classifier on the target training
        images (``datamodule.train_sets["target"]``, evaluation transform, in eval mode)."""
        if not isinstance(getattr(module, "source_head", None), nn.Linear):
            raise ValueError(
                f"Co-Tuning fine-tunes the module's source_head, but {type(module).__name__} has "
                "none: FineTune creates it for a regulariser with uses_source_head=True when it "
                "is built with num_source_classes (the source model's classifier)"
            )
        weight, bias = pretrained_classifier(module)
        device = next(module.head.parameters()).device
        weight, bias = weight.to(device), bias.to(device)

        def preprocess(batch: Any) -> tuple[Tensor, Tensor]:
            return datamodule.on_after_batch_transfer(batch, 0)

        probabilities, labels = source_probabilities(
            module, weight, bias, split_loader(datamodule, "train"), preprocess, self.logit_scale
        )
        self.relationship = self.learn_relationship(
            probabilities, labels, module.head.out_features
        ).to(device=device, dtype=weight.dtype)

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

    def forward(self, step: FineTuneStep, module: FineTune) -> Tensor:
        if self.relationship.numel() == 0:
            raise RuntimeError(
                "Co-Tuning has no category relationship yet: call CoTuning.setup(module, "
                "datamodule) (FineTune.setup_regularizers) before training"
            )
        source_logits = module.source_head(step.features)
        soft_labels = self.relationship[step.labels]
        if step.pairs is not None:
            soft_labels = step.pairs.mix(soft_labels)
        loss = -(soft_labels * F.log_softmax(source_logits, dim=1)).sum(dim=1).mean()
        return self.trade_off * loss
