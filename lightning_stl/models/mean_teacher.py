"""The mean teacher of SMILE (Section 3.3; Tarvainen & Valpola 2017): a moving average of the student.

SMILE's L^FE and L^FC (Eqs. 4-5) compare the student with a teacher that starts as the pre-trained
source model ω_s and is "periodically updated by the fine-tuned model in a moving average manner":

    θ_T ← decay · θ_T + (1 − decay) · θ_S        (every ``every_n_steps`` optimiser steps)

:class:`MeanTeacher` holds the teacher's backbone and source-class classifier. It is a sub-module of
the LightningModule, so it is saved in and restored from checkpoints with the student, but its
parameters never require gradients, it is never handed to the optimiser, it stays in eval mode
(BatchNorm uses its running statistics) whatever ``.train()`` is called with, and its forward runs
under ``torch.no_grad``. The averaging is torch's
(:func:`torch.optim.swa_utils.get_ema_multi_avg_fn`): one fused ``torch._foreach_lerp_`` over all
parameters and (by default) floating-point buffers, no Python loop over tensors.

What is averaged: the paper does not say. By default the teacher averages parameters *and* the
float buffers (BatchNorm's running mean and variance) and copies the integer ones, so its
normalisation follows the student's. ``buffers=False`` averages ``named_parameters()`` only and
leaves every buffer at its pre-trained value, as the authors' code does (``mean_teacher_update``
in lixingjian/SMILE ``finetune.py`` loops over ``model_source.named_parameters()``): its teacher
normalises with ImageNet's BatchNorm statistics for the whole run.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import get_ema_multi_avg_fn

# Why the teacher is not a torch.optim.swa_utils.AveragedModel nor a timm.utils.ModelEmaV3, whose
# averaging it uses (get_ema_multi_avg_fn is the same fused torch._foreach_lerp_ ModelEmaV3 calls):
# * both hold the averaged copy as `.module`: the keys would move from teacher.backbone.* to
#   teacher.backbone.module.* (AveragedModel adds n_averaged), so checkpoints written so far and
#   the code and tests that read the teacher's keys (tests/test_smile.py) would no longer fit;
# * buffers=False (the official code) keeps the pre-trained BatchNorm statistics, but
#   AveragedModel(use_buffers=False) and ModelEmaV3(exclude_buffers=True) copy the student's
#   buffers at every update;
# * AveragedModel(use_buffers=True) with get_ema_multi_avg_fn averages BatchNorm's integer
#   num_batches_tracked and truncates it (0.9 * 0 + 0.1 * 7 -> 0), where it is copied here (as
#   ModelEmaV3 does); its first update_parameters copies instead of averaging (n_averaged == 0);
#   and it fixes the decay when built, while FineTune builds the teacher before the callback,
#   which owns the decay, exists;
# * include_classifier=False leaves the classifier out of the average, which would take a second
#   wrapper for the classifier.
# So the teacher keeps its own modules and picks the tensors; torch's function averages them.


class MeanTeacher(nn.Module):
    """A frozen, moving-average copy of a student's ``backbone`` and source ``classifier``.

    Args:
        backbone: The student's backbone (copied), a timm-style model with ``forward_features``
            ``[B, C, H, W] -> [B, C', h, w]`` and ``forward_head(x, pre_logits=True) -> [B, F]``.
        classifier: The student's auxiliary source-class head ``[B, F] -> [B, K_S]`` (copied), or
            ``None`` when no L^FC is trained.
    """

    def __init__(self, backbone: nn.Module, classifier: nn.Module | None = None):
        super().__init__()
        self.backbone = copy.deepcopy(backbone)
        self.classifier = copy.deepcopy(classifier) if classifier is not None else None
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> MeanTeacher:
        """Stay in eval mode: the teacher's BatchNorm statistics move only through :meth:`update`."""
        return super().train(False)

    def _modules_to_move(
        self, backbone: nn.Module, classifier: nn.Module | None, include_classifier: bool
    ) -> list[tuple[nn.Module, nn.Module]]:
        """(teacher module, student module): the backbone, and the classifier unless left out."""
        pairs = [(self.backbone, backbone)]
        if include_classifier and self.classifier is not None:
            if classifier is None:
                raise ValueError("the teacher has a classifier but the student gave none")
            pairs.append((self.classifier, classifier))
        return pairs

    @staticmethod
    def _tensors(
        pairs: list[tuple[nn.Module, nn.Module]], buffers: bool
    ) -> tuple[list[Tensor], list[Tensor]]:
        """(teacher tensors, student tensors) of ``pairs`` in state-dict order: parameters and
        buffers, or with ``buffers=False`` the parameters only."""
        ours, theirs = [], []
        for teacher, student in pairs:
            if buffers:
                t_state = teacher.state_dict(keep_vars=True)
                s_state = student.state_dict(keep_vars=True)
            else:
                t_state = dict(teacher.named_parameters())
                s_state = dict(student.named_parameters())
            if t_state.keys() != s_state.keys():
                raise ValueError("the student's modules no longer match the teacher's")
            ours += [value.data for value in t_state.values()]
            theirs += [s_state[key].data for key in t_state]
        return ours, theirs

    @torch.no_grad()
    def copy_from(self, backbone: nn.Module, classifier: nn.Module | None = None) -> None:
        """Make the teacher an exact copy of the student (the start of fine-tuning: ω_T = ω_s)."""
        ours, theirs = self._tensors(self._modules_to_move(backbone, classifier, True), True)
        for mine, student in zip(ours, theirs, strict=True):
            mine.copy_(student)

    @torch.no_grad()
    def update(
        self,
        backbone: nn.Module,
        classifier: nn.Module | None,
        decay: float,
        include_classifier: bool = True,
        buffers: bool = True,
    ) -> None:
        """θ_T ← decay·θ_T + (1 − decay)·θ_S over parameters and float buffers; integer buffers
        (BatchNorm's ``num_batches_tracked``) are copied. ``include_classifier=False`` keeps the
        teacher's classifier at its pre-trained weights, ``buffers=False`` every buffer (BatchNorm
        statistics) at its pre-trained value: the official code does both."""
        pairs = self._modules_to_move(backbone, classifier, include_classifier)
        floats: tuple[list[Tensor], list[Tensor]] = ([], [])
        ints: tuple[list[Tensor], list[Tensor]] = ([], [])
        for ours, theirs in zip(*self._tensors(pairs, buffers), strict=True):
            kind = floats if ours.is_floating_point() else ints
            kind[0].append(ours)
            kind[1].append(theirs)
        if floats[0]:
            get_ema_multi_avg_fn(decay)(*floats, None)
        if ints[0]:
            for mine, student in zip(*ints, strict=True):  # counters are copied, not averaged
                mine.copy_(student)

    @torch.no_grad()
    def forward(
        self, x: Tensor, feature_map: bool = False, classify: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """Teacher features of ``x`` and its source-class logits.

        Returns ``(features, logits)``: features are the pooled ``[B, F]`` (or, with
        ``feature_map``, the pre-pooling ``[B, C', h, w]``); logits are ``[B, K_S]``, or ``None``
        when ``classify`` is false or there is no classifier.
        """
        fmap = self.backbone.forward_features(x)
        pooled = self.backbone.forward_head(fmap, pre_logits=True)
        logits = self.classifier(pooled) if classify and self.classifier is not None else None
        return (fmap if feature_map else pooled), logits
