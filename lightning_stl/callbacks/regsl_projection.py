"""RegSL's layer-wise distance constraints: project the weights after every optimiser step.

Li & Zhang, "Improved Regularization and Robustness for Fine-tuning in Neural Networks",
NeurIPS 2021 (arXiv:2111.04578), Section 3: fine-tuning under the constraints

    ‖W_l − W⁰_l‖_F ≤ D_l = D · γ^(l−1),    l = 1, ..., L,

with W⁰ the pre-trained weights and radii growing exponentially with depth (the PAC-Bayes bound
of the paper depends on the distance each layer travels; later layers may move further), and the
new head's weights within ‖W_head‖_F ≤ D_head of zero. After each optimiser step every
constrained weight is projected back onto its ball:

    W ← W⁰ + (W − W⁰) · min(1, D_l / ‖W − W⁰‖_F)

(a weight already inside is left exactly as it is). This is the official code's
``FrobeniusConstraint`` (github.com/VirtuosoResearch/Regularized-Self-Labeling,
``utils/constraint.py``), applied after ``optimizer.step()``.

What a "layer" is (:func:`projection_radii`): the constraint applies to each weight tensor with two
or more dimensions (convolution and linear weights; biases and BatchNorm parameters are free, as
in the official code up to its extra clipping of BatchNorm scales, which this project leaves
out) of the backbone, with the depth index l of its group:

* ``groups=None`` (default): the backbone's top-level child modules that hold such weights, in
  order, are layers 1, 2, ... (DigitsCNN: conv1, conv2, conv3; a ResNet: conv1, layer1, layer2...);
* ``groups={"layer1": 0, "layer2": 0, "layer3": 1, "layer4": 2}``: name prefix → exponent
  l − 1; weights under no prefix are free. This dict is the official code's ResNet grouping (the
  stem is free, the radius is D for stages 1-2, Dγ for stage 3, Dγ² for stage 4).

Defaults: D = 7.80 and D_head = 14.08, the official README's ResNet-18 MIT-Indoor run (20% label
noise); γ = 1, the official configs' ``scale_factor`` (the README's commands leave it); γ > 1 gives
the paper's exponentially growing radii. All of them are meant to be tuned per data set.

The pre-trained weights W⁰ are snapshotted in the callback's ``setup`` hook, which Lightning runs
before it restores a checkpoint: they are the weights the module holds when ``Trainer.fit``
starts (the loaded source model, :func:`lightning_stl.method_module.build_module`), also for a resumed run,
and they are not saved in checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import lightning as L
import torch
from torch import Tensor, nn

from lightning_stl.callbacks.optimizer_step import AfterOptimizerStep
from lightning_stl.checks import number

log = logging.getLogger(__name__)


def _constrained(parameter: Tensor) -> bool:
    return parameter.ndim >= 2


def projection_radii(
    backbone: nn.Module,
    radius: float,
    growth: float = 1.0,
    groups: Mapping[str, int] | None = None,
) -> dict[str, float]:
    """``{parameter name: D_l}`` of the backbone's constrained weights (see the module docstring).

    Raises ``ValueError`` for a group prefix that names no weight of the backbone.
    """
    radius = number("RegSL radius", radius, above=0)
    growth = number("RegSL growth", growth, above=0)
    names = [n for n, p in backbone.named_parameters() if _constrained(p)]
    if groups is None:
        order: list[str] = []
        for name in names:
            top = name.split(".")[0]
            if top not in order:
                order.append(top)
        exponents = {top: i for i, top in enumerate(order)}
        return {n: radius * growth ** exponents[n.split(".")[0]] for n in names}
    radii = {}
    for prefix, exponent in groups.items():
        if isinstance(exponent, bool) or not isinstance(exponent, int) or exponent < 0:
            raise ValueError(
                f"RegSL groups[{prefix!r}]={exponent!r} is not allowed: the depth exponent l − 1 "
                "must be an integer >= 0"
            )
        matched = [n for n in names if n == prefix or n.startswith(f"{prefix}.")]
        if not matched:
            tops = sorted({n.split(".")[0] for n in names})
            raise ValueError(
                f"RegSL groups prefix {prefix!r} names no weight of {type(backbone).__name__}; "
                f"its weights are under {', '.join(tops)}"
            )
        radii.update({n: radius * growth**exponent for n in matched})
    return radii


@torch.no_grad()
def project_(weight: Tensor, reference: Tensor, radius: float) -> None:
    """In place: ``weight`` onto the ball ‖weight − reference‖_F ≤ radius (unchanged inside)."""
    delta = weight - reference
    norm = torch.linalg.vector_norm(delta)
    scale = (radius / norm).clamp(max=1.0)
    weight.copy_(torch.where(norm > radius, reference + delta * scale, weight))


class RegSLProjection(AfterOptimizerStep):
    """Projects the backbone's weights (and the head's) onto RegSL's balls after each optimiser
    step (once per step under gradient accumulation).

    Works with a LightningModule with a ``backbone`` and a ``head`` (FineTune).

    Args:
        radius: D, the radius of the first layer, > 0.
        growth: γ > 0, the factor of the radius per layer of depth (γ ≥ 1: growing).
        head_radius: D_head, radius around zero of the head's weight; ``None``: unconstrained.
        groups: Name prefix → depth exponent (see the module docstring); ``None``: the
            backbone's top-level children in order.
    """

    def __init__(
        self,
        radius: float = 7.80,
        growth: float = 1.0,
        head_radius: float | None = 14.08,
        groups: Mapping[str, int] | None = None,
    ):
        self.radius = number("RegSL radius", radius, above=0)
        self.growth = number("RegSL growth", growth, above=0)
        self.head_radius = (
            None if head_radius is None else number("RegSL head_radius", head_radius, above=0)
        )
        self.groups = None if groups is None else dict(groups)
        self.radii: dict[str, float] = {}
        self.references: dict[str, Tensor] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        backbone = getattr(pl_module, "backbone", None)
        if not isinstance(backbone, nn.Module):
            raise ValueError(
                f"RegSLProjection constrains a fine-tuned backbone, but {type(pl_module).__name__} "
                "has no `backbone` module (use it with FineTune)"
            )
        if self.head_radius is not None and not isinstance(
            getattr(pl_module, "head", None), nn.Module
        ):
            raise ValueError(
                f"RegSLProjection head_radius={self.head_radius}: {type(pl_module).__name__} has "
                "no `head` module; set head_radius=null"
            )
        self.radii = projection_radii(backbone, self.radius, self.growth, self.groups)
        # the centres: the module's frozen pre-trained snapshot ω⁰ when it keeps one (shared,
        # never trained, read where it is at each step), else a copy of the backbone as it is
        # when training starts
        self.references = {}
        if not isinstance(getattr(pl_module, "pretrained", None), nn.Module):
            parameters = dict(backbone.named_parameters())
            self.references = {n: parameters[n].detach().clone() for n in self.radii}
        log.info(
            "RegSL: %d weights of the backbone constrained, radii %g to %g",
            len(self.radii),
            min(self.radii.values(), default=0.0),
            max(self.radii.values(), default=0.0),
        )

    def after_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, step: int
    ) -> None:
        self.project(pl_module)

    def project(self, pl_module: nn.Module) -> None:
        """Project every constrained weight of ``pl_module`` onto its ball."""
        parameters = dict(pl_module.backbone.named_parameters())
        pretrained = getattr(pl_module, "pretrained", None)
        centres = self.references
        if isinstance(pretrained, nn.Module):
            centres = {n: p.detach() for n, p in pretrained.named_parameters()}
        for name, radius in self.radii.items():
            weight = parameters[name]
            reference = centres[name]
            if reference.device != weight.device or reference.dtype != weight.dtype:
                reference = centres[name] = reference.to(weight.device, weight.dtype)
            project_(weight.data, reference, radius)
        if self.head_radius is not None:
            weight = pl_module.head.weight
            project_(weight.data, torch.zeros_like(weight), self.head_radius)
