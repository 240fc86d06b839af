"""SMILE's two sample-to-feature mixup regularisers (Li, Xiong, Dou et al., Section 3.2).

Both compare the student's output on the mixed batch B_m = mix(B) with the same mix of a mean
teacher's outputs on the clean batch B (see :class:`~lightning_stl.regularizers.mixup.MixupPairs`
for the mix, which uses one λ and one shuffle π for everything):

* :class:`FeatureMixupLoss` is L^FE (Eq. 4), on the features g of the backbone;
* :class:`LabelMixupLoss` is L^FC (Eq. 5), on the source-class outputs z of an auxiliary head
  initialised from the pre-trained classifier.

Each has the paper's form (the default) and the form of the authors' code (``form="official"``):

==========  ============================================  ============================================
term        paper (default)                               official code (lixingjian/SMILE)
==========  ============================================  ============================================
L^FE        ‖g(B_m) − mix(g_T(B))‖²₂ on pooled features   ‖G(B_m) − mix(G_T(B))‖_F / (h·w): the
            ``[B, F]``, mean over the batch                Frobenius norm of the WHOLE batch's
                                                          difference on the pre-pooling map ``G``
                                                          ``[B, C, h, w]``, not squared and not
                                                          averaged over the batch (``finetune.py``
                                                          line 305: ``torch.norm(fm_src - fm_tgt)
                                                          / (h * w)``)
L^FC        ‖p'(B_m) − mix(p_T(B))‖²₂ on softmax outputs   −Σ_k mix(p_T(B))_k · log p'(B_m)_k (soft
            (Eq. 5: "softmax outputs in 1,000 dims")       cross-entropy), mean over the batch
==========  ============================================  ============================================

The two L^FE forms differ in scale *and* in how the gradient depends on the batch: the official
norm's gradient is D / (‖D‖_F · h·w), the paper form's 2·D_i / B per image, so γ_FE does not carry
over from one form to the other (the official code uses γ_FE = 0.01, ``finetune.py`` line 294).

The teacher's outputs never carry gradients (they are computed under ``torch.no_grad``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_stl.checks import choice
from lightning_stl.regularizers.base import at_least_float32
from lightning_stl.regularizers.mixup import MixupPairs

FORMS = ("paper", "official")


class FeatureMixupLoss(nn.Module):
    """L^FE, Eq. 4 of SMILE: sample-to-feature mixup against the teacher's mixed features.

    ``forward(student, teacher, pairs)``:

    * ``form="paper"``: ``student`` = g(B_m) and ``teacher`` = g_T(B), both ``[B, F]`` (pooled);
      returns mean_i ‖student_i − mix(teacher)_i‖²₂.
    * ``form="official"``: both ``[B, C, h, w]`` (before pooling); returns
      ‖student − mix(teacher)‖_F / (h·w), the Frobenius norm of the whole ``[B, C, h, w]``
      difference (not squared, not a mean over the batch), as the authors' code computes it.
    """

    def __init__(self, form: str = "paper"):
        super().__init__()
        self.form = choice("feature mixup (L_FE) form", form, FORMS)

    @property
    def uses_feature_map(self) -> bool:
        """Whether the loss wants the pre-pooling feature map instead of pooled features."""
        return self.form == "official"

    def forward(self, student: Tensor, teacher: Tensor, pairs: MixupPairs) -> Tensor:
        if student.shape != teacher.shape:
            raise ValueError(
                f"student and teacher features differ in shape: {tuple(student.shape)} vs "
                f"{tuple(teacher.shape)}"
            )
        # float32 under bf16 autocast too: the squared distance sums hundreds of features
        student, expected = at_least_float32(student), pairs.mix(at_least_float32(teacher.detach()))
        if self.form == "official":
            if student.ndim != 4:
                raise ValueError(
                    f"the official L_FE needs a feature map [B, C, h, w], got {tuple(student.shape)}"
                )
            # torch.norm(fm_src.detach() - fm_tgt) / (h * w) of the authors' finetune.py
            height, width = student.shape[2], student.shape[3]
            return torch.linalg.vector_norm(student - expected) / (height * width)
        return (student - expected).pow(2).flatten(1).sum(dim=1).mean()


class LabelMixupLoss(nn.Module):
    """L^FC, Eq. 5 of SMILE: the auxiliary source-class head against the teacher's mixed outputs.

    ``forward(student_logits, teacher_logits, pairs)`` with ``student_logits`` = z'(B_m) of the
    auxiliary head and ``teacher_logits`` = z_T(B) of the teacher's source classifier, both
    ``[B, K_S]``. The paper's form is the squared distance between softmax outputs; the official
    form is the cross-entropy of the student against the mixed teacher probabilities.
    """

    def __init__(self, form: str = "paper"):
        super().__init__()
        self.form = choice("label mixup (L_FC) form", form, FORMS)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, pairs: MixupPairs) -> Tensor:
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(
                f"student and teacher source-class outputs differ in shape: "
                f"{tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}"
            )
        # float32 under bf16 autocast too: a softmax over 1,000 classes and its sum need the digits
        student_logits, teacher_logits = map(at_least_float32, (student_logits, teacher_logits))
        expected = pairs.mix(teacher_logits.detach().softmax(dim=1))
        if self.form == "official":
            return -(expected * F.log_softmax(student_logits, dim=1)).sum(dim=1).mean()
        return (student_logits.softmax(dim=1) - expected).pow(2).sum(dim=1).mean()
