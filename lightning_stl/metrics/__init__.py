"""torchmetrics Metrics of the SMILE paper."""

from lightning_stl.metrics.interpolation_loss import (
    InterpolationLoss,
    interpolation_inputs,
    sample_mixing_weights,
)

__all__ = ["InterpolationLoss", "interpolation_inputs", "sample_mixing_weights"]
