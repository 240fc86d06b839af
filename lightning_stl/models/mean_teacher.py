"""The mean teacher of SMILE (Section 3.3; Tarvainen & Valpola 2017): a moving average of the student.

SMILE's L^FE and L^FC (Eqs. 4-5) compare the student with a teacher that starts as the pre-trained
source model ω_s and is "periodically updated by the fine-tuned model in a moving average manner":

    θ_T ← decay · θ_T + (1 − decay) · θ_S        (every ``every_n_steps`` optimiser steps)

:class:`MeanTeacher` holds the teacher's backbone and source-class classifier. It is a sub-module of
the LightningModule, so it is saved in and restored from checkpoints with the student, but its
parameters never require gradients, it is never handed to the optimiser, it stays in eval mode
(BatchNorm uses its running statistics) whatever ``.train()`` is called with, and its forward runs
under ``torch.no_grad``. The update is fused: one ``torch._foreach_lerp_`` over all parameters and
(by default) floating-point buffers (as timm's ``ModelEmaV3`` does), no Python loop over tensors.

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

    def _pairs(
        self,
        backbone: nn.Module,
        classifier: nn.Module | None,
        include_classifier: bool,
        buffers: bool = True,
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """(teacher floats, student floats, teacher integer buffers, student integer buffers);
        with ``buffers=False`` parameters only (both buffer lists empty)."""
        modules = [(self.backbone, backbone)]
        if include_classifier and self.classifier is not None:
            if classifier is None:
                raise ValueError("the teacher has a classifier but the student gave none")
            modules.append((self.classifier, classifier))
        ours, theirs, our_ints, their_ints = [], [], [], []
        for teacher, student in modules:
            if buffers:
                t_state = teacher.state_dict(keep_vars=True)
                s_state = student.state_dict(keep_vars=True)
            else:
                t_state = dict(teacher.named_parameters())
                s_state = dict(student.named_parameters())
            if t_state.keys() != s_state.keys():
                raise ValueError("the student's modules no longer match the teacher's")
            for key, t_value in t_state.items():
                s_value = s_state[key]
                if t_value.is_floating_point():
                    ours.append(t_value.data)
                    theirs.append(s_value.data)
                else:
                    our_ints.append(t_value.data)
                    their_ints.append(s_value.data)
        return ours, theirs, our_ints, their_ints

    @torch.no_grad()
    def copy_from(self, backbone: nn.Module, classifier: nn.Module | None = None) -> None:
        """Make the teacher an exact copy of the student (the start of fine-tuning: ω_T = ω_s)."""
        ours, theirs, our_ints, their_ints = self._pairs(backbone, classifier, True)
        torch._foreach_copy_(ours + our_ints, theirs + their_ints)

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
        ours, theirs, our_ints, their_ints = self._pairs(
            backbone, classifier, include_classifier, buffers
        )
        torch._foreach_lerp_(ours, theirs, 1.0 - decay)
        if our_ints:
            torch._foreach_copy_(our_ints, their_ints)

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
