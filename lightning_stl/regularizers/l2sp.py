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

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lightning_stl.regularizers.base import FineTuneStep, Regularizer
from lightning_stl.regularizers.smile import check_loss_weight

if TYPE_CHECKING:  # pragma: no cover
    from lightning_stl.methods.finetune import FineTune

_REFERENCE = "reference_"


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

    ``forward(step, module)`` returns the scalar

        α/2 · Σ_{p ∈ backbone} ‖p − p⁰‖²₂ + β/2 · (‖head.weight‖²₂ + ‖head.bias‖²₂)

    over every parameter p of ``module.backbone`` (convolutions, BatchNorm affine parameters...,
    as the official code: all parameters but the classifier) with p⁰ its value when
    :meth:`setup` ran, i.e. the loaded source model; ``module.head`` is the new target head
    ``[K_T, F]``. At the start of fine-tuning the first term is 0.

    Args:
        alpha: α ≥ 0, weight of the distance to the starting point. Default 0.01: the default of
            the DELTA authors' code (``train.py --reg_type l2_sp --alpha 0.01``) and of tllib; the
            L2-SP paper chooses α and β by cross-validation. SMILE's own code uses 0.001 for
            CUB-200 and FGVC-Aircraft and 0.0001 for Stanford Cars, without the head term.
        beta: β ≥ 0, weight decay of the new head. Default 0.01 (same sources).

    With L2-SP the paper trains *without* ordinary weight decay: the penalty replaces it. Set
    ``optimizer.weight_decay=0`` (the ``method=l2sp`` config cannot, as the optimizer is its own
    config group), otherwise the backbone is also pulled towards 0.

    The snapshot w⁰ is held in non-persistent buffers: it moves with the module (``.to``) but is
    not in ``state_dict``, because :meth:`setup` always runs again (on the source model) before a
    checkpoint is loaded.
    """

    name = "l2sp"

    def __init__(self, alpha: float = 0.01, beta: float = 0.01):
        super().__init__()
        self.alpha = check_loss_weight("L2SP alpha (α)", alpha)
        self.beta = check_loss_weight("L2SP beta (β)", beta)
        self._names: list[str] = []

    def setup(self, module: FineTune, datamodule: Any = None) -> None:
        """Snapshot w⁰: a copy of every backbone parameter, as loaded from the source model."""
        for key in [k for k in self._buffers if k.startswith(_REFERENCE)]:
            del self._buffers[key]
        self._names = []
        for index, (name, param) in enumerate(module.backbone.named_parameters()):
            self.register_buffer(f"{_REFERENCE}{index}", param.detach().clone(), persistent=False)
            self._names.append(name)

    def references(self) -> list[Tensor]:
        """w⁰, one tensor per backbone parameter, in ``named_parameters()`` order."""
        return [self._buffers[f"{_REFERENCE}{i}"] for i in range(len(self._names))]

    def distance(self, backbone: nn.Module) -> Tensor:
        """‖w_S − w⁰_S‖²₂ (scalar, without α/2) of ``backbone`` to the snapshot."""
        if not self._names:
            raise RuntimeError("L2SP has no starting point: call setup(module, datamodule) first")
        named = list(backbone.named_parameters())
        names = [name for name, _ in named]
        if names != self._names:
            raise RuntimeError(
                f"the backbone's parameters changed since L2SP.setup: {len(names)} parameters now, "
                f"{len(self._names)} at setup; call setup again after changing the backbone"
            )
        terms = [
            (p - ref).pow(2).sum() for (_, p), ref in zip(named, self.references(), strict=True)
        ]
        return torch.stack(terms).sum() if terms else torch.zeros(())

    def forward(self, step: FineTuneStep, module: FineTune) -> Tensor:
        penalty = 0.5 * self.alpha * self.distance(module.backbone)
        return penalty + 0.5 * self.beta * head_penalty(module.head)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}"
