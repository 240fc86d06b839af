"""Vanilla mixup (Zhang et al. 2018) as SMILE uses it: one λ per batch, a batch mixed with a shuffle.

Algorithm 1 of SMILE, lines 6-7 and 9:

    λ ~ Beta(α, α),    B_m = λ·B + (1 − λ)·Shuffle(B),
    L_MXP = λ·CE(z(B_m), y) + (1 − λ)·CE(z(B_m), y[π])

This project writes every SMILE mix the way Algorithm 1 does: ``mix(u, π) = λ·u + (1 − λ)·u[π]``
for inputs, labels, features (Eq. 4) and source-class outputs (Eq. 5) alike, with the same λ and
the same permutation π (the paper's Eq. 4 writes Mix_λ(u, v) = (1 − λ)·u + λ·v, the same operator
with λ and 1 − λ swapped; since Beta(α, α) is symmetric the two are the same in distribution).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_stl.checks import number


def check_mixup_alpha(alpha: float) -> float:
    """``alpha`` as a float; a clear error unless it is a positive Beta parameter."""
    return number("mixup alpha", alpha, above=0, what="the Beta(α, α) parameter")


def mix(first: Tensor, second: Tensor, weight: float | Tensor) -> Tensor:
    """``weight·first + (1 − weight)·second``: the one mixing convention of the project (images,
    one-hot labels, features, outputs), for batches ``[B, ...]``. ``weight`` is one float or one
    weight per sample ``[B]``."""
    if isinstance(weight, Tensor):
        weight = weight.to(first.dtype).view((-1,) + (1,) * (first.ndim - 1))
    return torch.lerp(second, first, weight)


@dataclass(frozen=True)
class MixupPairs:
    """One draw of Algorithm 1's lines 6-7: the weight λ and the shuffle π of a batch of B.

    ``target_weight`` is λ (a float), ``permutation`` is π (``[B]`` int64 on the batch's device).
    """

    target_weight: float
    permutation: Tensor

    @classmethod
    def draw(
        cls,
        batch_size: int,
        alpha: float,
        device: torch.device | str = "cpu",
        fold: bool = False,
    ) -> MixupPairs:
        """λ ~ Beta(α, α) (folded to max(λ, 1 − λ) when ``fold``) and a uniform random π.

        λ is drawn on the CPU from torch's global RNG (seeded by ``seed_everything``), so a run
        draws the same λ sequence on any device.
        """
        alpha = check_mixup_alpha(alpha)
        concentration = torch.tensor(alpha, dtype=torch.float64)
        weight = float(torch.distributions.Beta(concentration, concentration).sample())
        if fold:
            weight = max(weight, 1.0 - weight)
        permutation = torch.randperm(batch_size).to(device)
        return cls(weight, permutation)

    def mix(self, values: Tensor) -> Tensor:
        """λ·u + (1 − λ)·u[π] for a batch ``[B, ...]`` (inputs, one-hot labels, features...)."""
        return mix(values, values[self.permutation], self.target_weight)

    def cross_entropy(self, logits: Tensor, labels: Tensor) -> Tensor:
        """L_MXP: λ·CE(logits, y) + (1 − λ)·CE(logits, y[π]), each a mean over the batch.

        Equal to the cross-entropy against the mixed one-hot labels ``mix(one_hot(y))``.
        """
        first = F.cross_entropy(logits, labels)
        second = F.cross_entropy(logits, labels[self.permutation])
        return self.target_weight * first + (1.0 - self.target_weight) * second
