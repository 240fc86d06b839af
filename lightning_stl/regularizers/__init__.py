"""Regularisers of fine-tuning, one per file; each ``forward`` returns its penalty.

* :mod:`.base`: the :class:`Regularizer` interface, the :class:`FineTuneSetup` it is handed
  once and the :class:`FineTuneStep` it sees each step;
* :mod:`.mixup`: vanilla mixup (L^MXP of SMILE, Algorithm 1);
* :mod:`.smile`: SMILE's sample-to-feature (L^FE, Eq. 4) and source-label (L^FC, Eq. 5) mixup;
* :mod:`.l2sp`: L2-SP (Li, Grandvalet, Davoine 2018);
* :mod:`.delta`: DELTA (Li et al. 2019), attention-weighted feature-map distance, and
  :mod:`.delta_channels`, the estimate of its channel weights;
* :mod:`.bss`: Batch Spectral Shrinkage (Chen et al. 2019);
* :mod:`.cotuning`: Co-Tuning (You et al. 2020);
* :mod:`.regsl`: RegSL's self-labelling and re-weighting (Li & Zhang 2021).

RIFLE's re-initialisation and RegSL's projection act on training time: see
:mod:`lightning_stl.callbacks`. In a config they are chosen by name, composable:
``method.regularizers=[delta, mixup]`` (``conf/regularizer/<name>.yaml``).
"""

from lightning_stl.regularizers.base import (
    FineTuneSetup,
    FineTuneStep,
    Regularizer,
    pretrained_snapshot,
)
from lightning_stl.regularizers.bss import BatchSpectralShrinkage
from lightning_stl.regularizers.cotuning import CoTuning
from lightning_stl.regularizers.delta import DELTA
from lightning_stl.regularizers.l2sp import L2SP
from lightning_stl.regularizers.mixup import MixupPairs, check_mixup_alpha
from lightning_stl.regularizers.regsl import RegSL
from lightning_stl.regularizers.smile import FeatureMixupLoss, LabelMixupLoss

__all__ = [
    "DELTA",
    "L2SP",
    "BatchSpectralShrinkage",
    "CoTuning",
    "FeatureMixupLoss",
    "FineTuneSetup",
    "FineTuneStep",
    "LabelMixupLoss",
    "MixupPairs",
    "RegSL",
    "Regularizer",
    "check_mixup_alpha",
    "pretrained_snapshot",
]
