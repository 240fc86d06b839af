"""L2-SP: weight decay towards the pre-trained starting point (Li, Grandvalet, Davoine 2018).

"Explicit Inductive Bias for Transfer Learning with Convolutional Networks" (ICML 2018), the
L2-SP penalty:

    Ω(w) = α/2 · ‖w_S − w⁰_S‖²₂ + β/2 · ‖w_S̄‖²₂

where w_S are the parameters shared with the source model (this project's backbone), w⁰_S their
pre-trained values (the SP, "starting point") and w_S̄ the parameters of the new target head.

Every fine-tuning regulariser that penalises the new head (L2-SP, DELTA) uses
:func:`head_penalty` for its β/2 · ‖w_S̄‖² term.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_stl.checks import number
from lightning_stl.regularizers.base import FineTuneStep, Regularizer


def head_penalty(head: nn.Module) -> Tensor:
    """‖w_S̄‖²₂ of the new target head: the sum of squares of all its parameters (weight ``[K, F]``
    and bias ``[K]`` of an ``nn.Linear``), as the official DELTA/L2-SP code penalises ``fc.*``.
    Returns a scalar (without the β/2 factor)."""
    return sum((p.pow(2).sum() for p in head.parameters()), torch.zeros((), device=_device(head)))


def _device(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


class L2SP(Regularizer):
    """The L2-SP penalty Ω(w) of Li, Grandvalet, Davoine (ICML 2018).

    ``forward(step)`` returns the scalar

        α/2 · Σ_{p ∈ backbone} ‖p − p⁰‖²₂ + β/2 · (‖head.weight‖²₂ + ‖head.bias‖²₂)

    over every parameter p of the set-up's ``backbone`` (convolutions, BatchNorm affine
    parameters..., as the official code: all parameters but the classifier) with p⁰ the same
    parameter of ``pretrained`` (the frozen pre-trained backbone, :class:`FineTuneSetup`); ``head``
    is the new target head ``[K_T, F]``. At the start of fine-tuning the first term is 0.

    Args:
        alpha: α ≥ 0, weight of the distance to the starting point. Default 0.01: the default of
            the DELTA authors' code (``train.py --reg_type l2_sp --alpha 0.01``) and of tllib; the
            L2-SP paper chooses α and β by cross-validation. SMILE's own code uses 0.001 for
            CUB-200 and FGVC-Aircraft and 0.0001 for Stanford Cars, without the head term.
        beta: β ≥ 0, weight decay of the new head. Default 0.01 (same sources).

    With L2-SP the paper trains *without* ordinary weight decay: the penalty replaces it. Set
    ``optimizer.weight_decay=0`` (the ``method=l2sp`` config cannot, as the optimizer is its own
    config group), otherwise the backbone is also pulled towards 0.
    """

    name = "l2sp"
    uses_pretrained = True

    def __init__(self, alpha: float = 0.01, beta: float = 0.01):
        super().__init__()
        self.alpha = number("L2SP alpha (α)", alpha, at_least=0)
        self.beta = number("L2SP beta (β)", beta, at_least=0)

    def distance(self) -> Tensor:
        """‖w_S − w⁰_S‖²₂ (scalar, without α/2) of the backbone to the pre-trained one."""
        setup = self.require_setup()
        named = list(setup.backbone.named_parameters())
        reference = dict(self.require_pretrained().named_parameters())
        if [name for name, _ in named] != list(reference):
            raise RuntimeError(
                f"the backbone has {len(named)} parameters, the pre-trained backbone "
                f"{len(reference)} of other names: L2SP needs a copy of the same backbone"
            )
        terms = [(p - reference[name].to(p)).pow(2).sum() for name, p in named]
        return torch.stack(terms).sum() if terms else torch.zeros(())

    def forward(self, step: FineTuneStep) -> Tensor:
        penalty = 0.5 * self.alpha * self.distance()
        return penalty + 0.5 * self.beta * head_penalty(self.require_setup().head)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}"
