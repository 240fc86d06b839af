"""Interpolation loss (SMILE, Section 5.2.1, Eq. 6): how linearly a function behaves between samples.

    IL(f) = E_{x,x'} E_{δ1,δ2 ~ P_δ} E_{λ ~ P_λ} ‖ f(Mix_{λδ1+(1−λ)δ2}(x, x'))
                                                − (λ f(Mix_{δ1}(x, x')) + (1−λ) f(Mix_{δ2}(x, x'))) ‖₂

with Mix_δ(u, v) = δ·u + (1 − δ)·v, the mix of every SMILE loss in this project
(:meth:`lightning_stl.regularizers.mixup.MixupPairs.mix`, λ·u + (1 − λ)·u[π]; the paper's Eq. 4
writes (1 − δ)·u + δ·v, the same operator with δ and 1 − δ swapped, the same in distribution for
δ ~ Beta(α, α)). Because Mix_{λδ1+(1−λ)δ2}(x, x') = λ·Mix_{δ1}(x, x') + (1−λ)·Mix_{δ2}(x, x'),
the loss is zero for every affine f. On the features of the backbone it is the paper's
Feature-IL, on the classifier's outputs its Label-IL (Table 6). The distributions P_δ and P_λ are
not given in the paper; this uses Beta(α, α) for both (α = 1: uniform).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_stl.regularizers.mixup import mix


def sample_mixing_weights(
    batch_size: int, alpha: float = 1.0, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """δ1, δ2 and λ, each ``[B]`` from Beta(α, α), drawn on the CPU.

    Without ``generator`` they come from torch's global RNG. With one, from a seed drawn from
    ``generator``: the same generator state gives the same draws, and the global RNG is left
    as it was (``torch.distributions`` takes no generator, so a fork of the CPU RNG is seeded).
    """
    if alpha <= 0:
        raise ValueError(f"alpha={alpha} is not allowed: the Beta parameter must be > 0")
    beta = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha)))
    if generator is None:
        draws = beta.sample((3, batch_size))
    else:
        seed = int(torch.randint(0, 2**63 - 1, (), generator=generator))
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would reseed the caller's CUDA RNGs too
            torch.default_generator.manual_seed(seed)
            draws = beta.sample((3, batch_size))
    return draws[0], draws[1], draws[2]


def interpolation_inputs(
    x: Tensor, x_prime: Tensor, delta1: Tensor, delta2: Tensor, lam: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The three inputs of Eq. 6: Mix_{λδ1+(1−λ)δ2}(x, x'), Mix_{δ1}(x, x'), Mix_{δ2}(x, x')."""
    return (
        mix(x, x_prime, lam * delta1 + (1 - lam) * delta2),
        mix(x, x_prime, delta1),
        mix(x, x_prime, delta2),
    )


class InterpolationLoss(Metric):
    """Mean of D^it_λ (Eq. 6 of SMILE) over all updates: Feature-IL or Label-IL.

    ``update(out_mixed, out_first, out_second, lam)`` takes f of the three inputs made by
    :func:`interpolation_inputs` (each ``[B, ...]``) and λ ``[B]``.
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state(
            "total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, out_mixed: Tensor, out_first: Tensor, out_second: Tensor, lam: Tensor) -> None:
        if not out_mixed.shape == out_first.shape == out_second.shape:
            raise ValueError(
                f"the three outputs must have one shape, got {tuple(out_mixed.shape)}, "
                f"{tuple(out_first.shape)} and {tuple(out_second.shape)}"
            )
        # λ·f(Mix_δ1) + (1 − λ)·f(Mix_δ2) = Mix_λ(f(Mix_δ1), f(Mix_δ2))
        expected = mix(out_first, out_second, lam)
        distance = (out_mixed - expected).flatten(1).norm(dim=1)
        self.total += distance.sum().to(torch.float64)
        self.count += distance.numel()

    def compute(self) -> Tensor:
        return self.total / self.count.clamp_min(1)
