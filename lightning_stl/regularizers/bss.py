"""BSS: Batch Spectral Shrinkage (Chen, Wang, Fu, Long, Wang 2019).

"Catastrophic Forgetting Meets Negative Transfer: Batch Spectral Shrinkage for Safe Transfer
Learning" (NeurIPS 2019), the BSS regulariser: with the batch feature matrix
F = [f_1 … f_B]ᵀ ``[B, F_dim]`` and its singular values σ_1 ≥ … ≥ σ_b (b = min(B, F_dim)),

    L_bss(F) = η · Σ_{i=1}^{k} σ²_{−i}

penalises the k smallest singular values σ_{−1} = σ_b, σ_{−2} = σ_{b−1}, …: the spectral
components that fine-tuning on few images would otherwise learn (negative transfer).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_stl.checks import integer, number
from lightning_stl.regularizers.base import FineTuneStep, Regularizer


def smallest_singular_values_squared(features: Tensor, k: int) -> Tensor:
    """Σ_{i=1}^{k} σ²_{−i} of ``features`` ``[B, F_dim]`` (scalar), computed in float32 or wider.

    Raises ``ValueError`` when k exceeds the min(B, F_dim) singular values the matrix has.
    """
    if features.ndim != 2:
        raise ValueError(f"BSS needs a feature matrix [B, F], got shape {tuple(features.shape)}")
    batch, dim = features.shape
    if k > min(batch, dim):
        raise ValueError(
            f"BSS k={k} exceeds the {min(batch, dim)} singular values of the batch feature matrix "
            f"[B={batch}, F={dim}]: the batch has {batch} images; allowed: 1 <= k <= "
            f"min(batch size, feature dim) = {min(batch, dim)}"
        )
    if features.dtype not in (torch.float32, torch.float64):
        features = features.float()  # no SVD in half precision (mixed-precision runs)
    singular = torch.linalg.svdvals(features)  # [min(B, F)], descending
    return singular[-k:].pow(2).sum()


class BatchSpectralShrinkage(Regularizer):
    """L_bss of Chen et al. (NeurIPS 2019) on the student's pooled features.

    ``forward(step)`` takes ``step.features`` ``[B, F]`` (the backbone's pooled features
    of the images the student saw, after mixup when it is on) and returns the scalar
    η · Σ_{i=1}^{k} σ²_{−i}. The gradient flows through the SVD into the backbone.

    Args:
        eta: η ≥ 0. Default 0.001, the paper's and its official code's value (also SMILE's code,
            ``alpha_bss=0.001`` on all three data sets).
        k: How many of the smallest singular values to shrink, an integer ≥ 1. Default 1 (the
            paper's choice). Each batch needs at least k images (and F ≥ k).
    """

    name = "bss"

    def __init__(self, eta: float = 1e-3, k: int = 1):
        super().__init__()
        self.eta = number("BSS eta (η)", eta, at_least=0)
        self.k = integer("BSS k", k, low=1)

    def forward(self, step: FineTuneStep) -> Tensor:
        return self.eta * smallest_singular_values_squared(step.features, self.k)

    def extra_repr(self) -> str:
        return f"eta={self.eta}, k={self.k}"
