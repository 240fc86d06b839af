"""BatchNorm with dataset-specific batch statistics.

Smooth Transfer Learning, Appendix A.2: in the SVHN/MNIST experiment "dataset-specific batch
statistics are used; i.e., the source and target datasets have different sets of batch
statistics". A :class:`DomainBatchNorm` wraps one BatchNorm layer: its affine parameters (γ, β) are
shared, while the target and the source each have their own batch statistics in training and
their own running mean and variance for evaluation. A mixed batch ``[n_target + n_source, ...]``
(target rows first) is normalised in two parts. Evaluation on the target uses the target's running
statistics.

In the ``shared`` mode (Appendix A.1, CIFAR) no layer is wrapped: one BatchNorm normalises the
whole mixed batch at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

BATCHNORM_MODES = ("shared", "per_domain")


class DomainBatchNorm(nn.Module):
    """A BatchNorm layer with separate target and source statistics and shared γ, β.

    ``norm`` keeps the target's statistics (so a checkpoint of a ``per_domain`` model evaluates on
    the target like a plain one); ``source_running_mean``/``source_running_var`` keep the
    source's. Any ``_BatchNorm`` subclass works, timm's ``BatchNormAct2d`` included: the source
    half goes through the same module with its statistics swapped in.

    Set :attr:`num_target` (the number of leading target rows) before a mixed forward; ``None``
    means the whole batch is target data.
    """

    def __init__(self, norm: _BatchNorm):
        super().__init__()
        if not norm.track_running_stats:
            raise ValueError(
                "DomainBatchNorm needs a BatchNorm layer that tracks running statistics"
            )
        self.norm = norm
        self.register_buffer("source_running_mean", norm.running_mean.detach().clone())
        self.register_buffer("source_running_var", norm.running_var.detach().clone())
        self.register_buffer(
            "source_num_batches_tracked", norm.num_batches_tracked.detach().clone()
        )
        self.num_target: int | None = None

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0] if self.num_target is None else self.num_target
        if n >= x.shape[0]:
            return self.norm(x)
        if n <= 0:
            return self._source_forward(x)
        return torch.cat([self.norm(x[:n]), self._source_forward(x[n:])])

    def _source_forward(self, x: Tensor) -> Tensor:
        norm = self.norm
        saved = norm.running_mean, norm.running_var, norm.num_batches_tracked
        norm.running_mean = self.source_running_mean
        norm.running_var = self.source_running_var
        norm.num_batches_tracked = self.source_num_batches_tracked
        try:
            return norm(x)
        finally:
            norm.running_mean, norm.running_var, norm.num_batches_tracked = saved

    def copy_source_statistics_to_target(self) -> None:
        """Start the target's statistics from the source's (fine-tuning after source training)."""
        with torch.no_grad():
            self.norm.running_mean.copy_(self.source_running_mean)
            self.norm.running_var.copy_(self.source_running_var)
            self.norm.num_batches_tracked.copy_(self.source_num_batches_tracked)


def convert_to_domain_batchnorm(module: nn.Module) -> nn.Module:
    """Wrap every BatchNorm layer of ``module`` (in place) in a :class:`DomainBatchNorm`."""
    for name, child in list(module.named_children()):
        if isinstance(child, _BatchNorm):
            setattr(module, name, DomainBatchNorm(child))
        elif not isinstance(child, DomainBatchNorm):
            convert_to_domain_batchnorm(child)
    return module


def domain_norms(module: nn.Module) -> list[DomainBatchNorm]:
    """The :class:`DomainBatchNorm` layers of ``module``, in module order."""
    return [m for m in module.modules() if isinstance(m, DomainBatchNorm)]


@contextmanager
def domain_split(norms: list[DomainBatchNorm], num_target: int | None) -> Iterator[None]:
    """Within the block, the first ``num_target`` rows of every batch are target data."""
    for norm in norms:
        norm.num_target = num_target
    try:
        yield
    finally:
        for norm in norms:
            norm.num_target = None
