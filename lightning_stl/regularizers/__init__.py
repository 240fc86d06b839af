"""Regularisers of fine-tuning, one per file; each ``forward`` returns its penalty.

* :mod:`.mixup`: vanilla mixup (L^MXP of SMILE, Algorithm 1);
* :mod:`.smile`: SMILE's sample-to-feature (L^FE, Eq. 4) and source-label (L^FC, Eq. 5) mixup.
"""

from lightning_stl.regularizers.mixup import MixupPairs, check_mixup_alpha
from lightning_stl.regularizers.smile import (
    FeatureMixupLoss,
    LabelMixupLoss,
    check_loss_weight,
)

__all__ = [
    "FeatureMixupLoss",
    "LabelMixupLoss",
    "MixupPairs",
    "check_loss_weight",
    "check_mixup_alpha",
]
