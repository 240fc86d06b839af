"""One backbone g_θ with a target head h^T and a source head h^S (Smooth Transfer Learning, Sec. 2).

Eqs. 1–2: the target logits are h^T(g(x)) for x from the target, the source logits h^S(g(x)) for x
from the source. The two sub-batches go through the backbone as one batch (target rows first),
so that in the ``shared`` BatchNorm mode they are normalised together; in the ``per_domain`` mode
each part is normalised with its own statistics (see :mod:`.domain_batchnorm`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_stl.models.domain_batchnorm import (
    BATCHNORM_MODES,
    convert_to_domain_batchnorm,
    domain_norms,
    domain_split,
)


class SourceTargetClassifier(nn.Module):
    """Backbone ``[B, C, H, W] -> [B, F]`` with heads ``[B, F] -> [B, K_T]`` and ``[B, F] -> [B, K_S]``.

    The two heads may have different class counts. ``batchnorm`` is ``"shared"`` or
    ``"per_domain"``; both modes keep all their statistics in ``state_dict``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_target_classes: int,
        num_source_classes: int,
        batchnorm: str = "shared",
    ):
        super().__init__()
        if batchnorm not in BATCHNORM_MODES:
            raise ValueError(
                f"batchnorm={batchnorm!r} is not allowed: choose one of {', '.join(BATCHNORM_MODES)}"
            )
        num_features = getattr(backbone, "num_features", None)
        if not isinstance(num_features, int):
            raise ValueError(
                f"backbone {type(backbone).__name__} has no integer `num_features` (timm's interface)"
            )
        for name, count in (("target", num_target_classes), ("source", num_source_classes)):
            if count < 1:
                raise ValueError(f"num_{name}_classes={count} is not allowed: it must be >= 1")
        self.batchnorm = batchnorm
        self.backbone = (
            convert_to_domain_batchnorm(backbone) if batchnorm == "per_domain" else backbone
        )
        self.num_features = num_features
        self.target_head = nn.Linear(num_features, num_target_classes)
        self.source_head = nn.Linear(num_features, num_source_classes)
        self._norms = domain_norms(self.backbone)

    def forward(
        self, target_x: Tensor | None = None, source_x: Tensor | None = None
    ) -> tuple[Tensor | None, Tensor | None]:
        """Target and source logits; a sub-batch that is ``None`` costs nothing and gives ``None``."""
        if target_x is None and source_x is None:
            raise ValueError("forward needs a target or a source sub-batch")
        if source_x is None:
            return self.target_head(self.backbone(target_x)), None
        if target_x is None:
            with domain_split(self._norms, 0):
                return None, self.source_head(self.backbone(source_x))
        n = target_x.shape[0]
        with domain_split(self._norms, n):
            features = self.backbone(torch.cat([target_x, source_x]))
        return self.target_head(features[:n]), self.source_head(features[n:])

    def copy_source_statistics_to_target(self) -> None:
        """In ``per_domain`` mode, start the target's BatchNorm statistics from the source's."""
        for norm in self._norms:
            norm.copy_source_statistics_to_target()
