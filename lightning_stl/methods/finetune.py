"""Fine-tuning a pre-trained source model on the target: plain (L2), mixup, and SMILE.

SMILE (Li, Xiong, Dou et al.), Eqs. 2-3 and Algorithm 1: the target model starts from the
pre-trained source model ω_s (backbone g and source classifier), gets a new target head h, and an
auxiliary head z' over the *source* classes initialised from the pre-trained classifier. Each step
draws λ ~ Beta(α, α) and a shuffle π, mixes the target batch B into B_m = λ·B + (1 − λ)·B[π] and
minimises

    L = L^MXP + γ_FE · L^FE + γ_FC · L^FC

* L^MXP: mixup cross-entropy of h(g(B_m)) against λ·y + (1 − λ)·y[π];
* L^FE (Eq. 4): ‖g(B_m) − mix(g_T(B))‖² against the mean teacher's features of the clean batch;
* L^FC (Eq. 5): ‖z'(g(B_m)) − mix(z_T(B))‖² against the teacher's source-class outputs.

With γ_FE = γ_FC = 0 this is vanilla mixup fine-tuning (``method=mixup``); without mixup
(``mixup_alpha=null``) it is plain fine-tuning with weight decay (``method=finetune_l2``, "L²").
The ablations of Table 5 are γ_FE = 0 (``method=smile_no_fe``) and γ_FC = 0 (``smile_no_fc``).
The teacher (:class:`~lightning_stl.models.mean_teacher.MeanTeacher`) is moved by the
:class:`~lightning_stl.callbacks.MeanTeacherUpdate` callback.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_stl.checks import flag, number
from lightning_stl.methods.evaluation import TargetEvaluation
from lightning_stl.methods.regularizer_setup import fine_tune_setup
from lightning_stl.models.mean_teacher import MeanTeacher
from lightning_stl.models.registry import create_backbone
from lightning_stl.models.source_model import SourceModel
from lightning_stl.optim import SGDConfig
from lightning_stl.regularizers import (
    FeatureMixupLoss,
    FineTuneStep,
    LabelMixupLoss,
    MixupPairs,
    Regularizer,
    check_mixup_alpha,
    pretrained_snapshot,
)
from lightning_stl.schedule import TARGET


class FineTune(TargetEvaluation):
    """A pre-trained backbone with a new target head, trained on the target alone (SMILE, Eq. 2).

    Args:
        backbone, backbone_options, in_chans: The backbone, as for
            :class:`~lightning_stl.methods.SmoothTransfer`.
        num_target_classes: K_T, outputs of the new target head.
        num_source_classes: K_S, outputs of the auxiliary source-class head z' (taken from the
            pre-trained classifier); needed when ``label_mixup_weight > 0``.
        optimizer: Fields of :class:`~lightning_stl.optim.SGDConfig`.
        mixup_alpha: α of λ ~ Beta(α, α); ``None`` trains without mixup (plain cross-entropy).
        fold_mixup_weight: Use max(λ, 1 − λ) (the official code).
        feature_mixup_weight: γ_FE of L^FE (Eq. 4), >= 0.
        label_mixup_weight: γ_FC of L^FC (Eq. 5), >= 0.
        feature_mixup_form, label_mixup_form: ``"paper"`` or ``"official"`` (see
            :mod:`lightning_stl.regularizers.smile`).
        regularizers: Further :class:`~lightning_stl.regularizers.Regularizer` s (built by
            Hydra from ``method.regularizers``) whose penalties are added to the loss (L2-SP,
            DELTA, BSS, Co-Tuning...); they compose with mixup and SMILE.
        with_source_head: Whether the model has the auxiliary source-class head; ``None``:
            when γ_FC > 0 or a regulariser trains it (``uses_source_head``). The value decided is
            saved in ``hparams``.

    The teacher exists when γ_FE > 0 or γ_FC > 0; it is part of ``state_dict`` (checkpoints).
    The regularisers keep nothing in ``state_dict`` (they are set up again from the source
    model), nor does the pre-trained snapshot, so ``FineTune.load_from_checkpoint(path)``
    rebuilds a trained model from its plain ``hparams`` alone, without its regularisers.
    """

    def __init__(
        self,
        backbone: str = "digits_cnn",
        backbone_options: dict[str, Any] | None = None,
        in_chans: int = 1,
        num_target_classes: int = 10,
        num_source_classes: int | None = None,
        optimizer: dict[str, Any] | None = None,
        mixup_alpha: float | None = None,
        fold_mixup_weight: bool = False,
        feature_mixup_weight: float = 0.0,
        label_mixup_weight: float = 0.0,
        feature_mixup_form: str = "paper",
        label_mixup_form: str = "paper",
        regularizers: Sequence[Regularizer] = (),
        with_source_head: bool | None = None,
    ):
        super().__init__(num_target_classes)
        # objects stay out of the checkpoint's hparams (torch.load(weights_only=True))
        self.save_hyperparameters(ignore=["regularizers"])
        self.feature_mixup_weight = number(
            "method.module.feature_mixup_weight (γ_FE)", feature_mixup_weight, at_least=0
        )
        self.label_mixup_weight = number(
            "method.module.label_mixup_weight (γ_FC)", label_mixup_weight, at_least=0
        )
        self.mixup_alpha = None if mixup_alpha is None else check_mixup_alpha(mixup_alpha)
        regularised = self.feature_mixup_weight > 0 or self.label_mixup_weight > 0
        if regularised and self.mixup_alpha is None:
            raise ValueError(
                "SMILE's L_FE and L_FC are computed on mixed images: "
                "feature_mixup_weight > 0 or label_mixup_weight > 0 needs mixup_alpha > 0, "
                "got mixup_alpha=null"
            )
        if self.label_mixup_weight > 0 and not num_source_classes:
            raise ValueError(
                f"label_mixup_weight (γ_FC)={label_mixup_weight} > 0 needs the pre-trained "
                "model's source classifier for the auxiliary head, but the source model has "
                "none (num_source_classes=None). Give backbone.weights a file or checkpoint "
                "with a classifier, or set label_mixup_weight=0"
            )
        self.fold_mixup_weight = bool(fold_mixup_weight)
        self.optimizer_config = SGDConfig(**(optimizer or {}))
        self.backbone = create_backbone(backbone, in_chans=in_chans, **(backbone_options or {}))
        self.head = nn.Linear(self.backbone.num_features, num_target_classes)
        self.regularizers = nn.ModuleList(regularizers)
        wants_source_head = with_source_head
        if wants_source_head is not None:
            flag("method.module.with_source_head", wants_source_head)
        else:
            wants_source_head = self.label_mixup_weight > 0 or any(
                r.uses_source_head for r in self.regularizers
            )
        self.hparams["with_source_head"] = bool(wants_source_head)
        if not wants_source_head and self.label_mixup_weight > 0:
            raise ValueError(
                f"with_source_head=False is not allowed with label_mixup_weight (γ_FC)="
                f"{label_mixup_weight} > 0: L^FC trains the auxiliary source-class head"
            )
        if wants_source_head and not num_source_classes:
            raise ValueError(
                "a regulariser of this method trains the pre-trained source classifier "
                "(Co-Tuning), but the source model has none (num_source_classes=None); give "
                "backbone.weights a file or checkpoint with a classifier"
            )
        self.source_head = (
            nn.Linear(self.backbone.num_features, num_source_classes) if wants_source_head else None
        )
        self.source_model: SourceModel | None = None  # set by load_source_model, not saved
        # ω⁰, the one frozen copy of the pre-trained backbone every regulariser reads (L2-SP's
        # starting point, DELTA's frozen model, Co-Tuning's features, RegSL's projection centre);
        # loaded by load_source_model, never trained, always in eval mode (see train()).
        wants_pretrained = any(r.uses_pretrained for r in self.regularizers)
        self.pretrained = pretrained_snapshot(self.backbone) if wants_pretrained else None
        self.register_state_dict_post_hook(_without_pretrained)
        self.register_load_state_dict_pre_hook(_keep_pretrained)
        self.feature_mixup = FeatureMixupLoss(feature_mixup_form)
        self.label_mixup = LabelMixupLoss(label_mixup_form)
        self.teacher = MeanTeacher(self.backbone, self.source_head) if regularised else None

    # ------------------------------------------------------------------ source model
    def load_source_model(self, source: SourceModel) -> None:
        """ω_t^0 = ω_s (Algorithm 1, line 2): the backbone, the auxiliary head from the source
        classifier, and the teacher as a copy of both. The target head stays freshly initialised.
        """
        self.backbone.load_state_dict(source.backbone, strict=True)
        if self.pretrained is not None:
            self.pretrained.load_state_dict(source.backbone, strict=True)
        self.source_model = source
        if self.source_head is not None:
            if source.classifier is None:
                raise ValueError(
                    f"label_mixup_weight (γ_FC)={self.label_mixup_weight} (or Co-Tuning) needs a "
                    f"source classifier, but {source.origin} has none; set label_mixup_weight=0 "
                    "or give a source model with its classifier"
                )
            weight = source.classifier["weight"]
            if tuple(weight.shape) != tuple(self.source_head.weight.shape):
                raise ValueError(
                    f"the source classifier of {source.origin} has shape {list(weight.shape)}, "
                    f"the auxiliary head {list(self.source_head.weight.shape)}"
                )
            with torch.no_grad():
                self.source_head.weight.copy_(weight)
                self.source_head.bias.copy_(source.classifier["bias"])
        if self.teacher is not None:
            self.teacher.copy_from(self.backbone, self.source_head)

    def setup_regularizers(self, datamodule: Any) -> None:
        """:meth:`Regularizer.setup` of each regulariser with this model's backbone, heads and
        pre-trained snapshot and ``datamodule``'s target training images, after
        :meth:`load_source_model`."""
        if not self.regularizers:
            return
        setup = fine_tune_setup(
            self.backbone, self.head, self.pretrained, self.source_head, datamodule
        )
        for regularizer in self.regularizers:
            regularizer.setup(setup)

    def train(self, mode: bool = True) -> FineTune:
        """As ``nn.Module.train``, but the pre-trained snapshot stays in eval mode."""
        super().train(mode)
        if self.pretrained is not None:
            self.pretrained.eval()
        return self

    def teacher_sources(self) -> tuple[nn.Module, nn.Module | None]:
        """The student's modules the mean teacher averages: backbone and auxiliary head."""
        return self.backbone, self.source_head

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        """Target logits ``[B, K_T]`` for images ``[B, C, H, W]``."""
        return self.head(self.backbone(x))

    def extract_features(self, x: Tensor) -> Tensor:
        """Pooled features ``[B, F]`` of the last hidden layer (for Feature-IL)."""
        return self.backbone(x)

    def classify(self, features: Tensor) -> Tensor:
        """Target logits ``[B, K_T]`` from pooled features ``[B, F]`` (for Label-IL)."""
        return self.head(features)

    # ------------------------------------------------------------------ training
    def training_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Eq. 2-3 / Algorithm 1 on one target batch ``x`` ``[B, C, H, W]``, ``y`` ``[B]``.

        Returns the loss and its parts (for logging).
        """
        if self.mixup_alpha is None:
            pairs, mixed = None, x
        else:
            pairs = MixupPairs.draw(len(y), self.mixup_alpha, x.device, self.fold_mixup_weight)
            mixed = pairs.mix(x)
        wants_map = self.feature_mixup_weight > 0 and self.feature_mixup.uses_feature_map
        feature_map = self.backbone.forward_features(mixed)
        features = self.backbone.forward_head(feature_map, pre_logits=True)
        logits = self.head(features)
        if pairs is None:
            parts = {"ce": F.cross_entropy(logits, y)}
            loss = parts["ce"]
        else:
            parts = {"mixup": pairs.cross_entropy(logits, y)}
            loss = parts["mixup"]
        if self.regularizers:
            step = FineTuneStep(
                mixed, x, y, feature_map, features, logits, pairs, int(self.current_epoch)
            )
            for regularizer in self.regularizers:
                parts[regularizer.name] = regularizer(step)
                loss = loss + parts[regularizer.name]
        if self.teacher is not None:
            teacher_features, teacher_logits = self.teacher(
                x, feature_map=wants_map, classify=self.label_mixup_weight > 0
            )
            if self.feature_mixup_weight > 0:
                student = feature_map if wants_map else features
                parts["feature_mixup"] = self.feature_mixup(student, teacher_features, pairs)
                loss = loss + self.feature_mixup_weight * parts["feature_mixup"]
            if self.label_mixup_weight > 0:
                parts["label_mixup"] = self.label_mixup(
                    self.source_head(features), teacher_logits, pairs
                )
                loss = loss + self.label_mixup_weight * parts["label_mixup"]
        return loss, parts

    def training_step(self, batch: dict[str, tuple[Tensor, Tensor]], batch_idx: int) -> Tensor:
        if TARGET not in batch:
            raise ValueError("FineTune trains on the target: the batch has no 'target' sub-batch")
        x, y = batch[TARGET]
        loss, parts = self.training_loss(x, y)
        self.log_training_loss(loss, parts)
        return loss

    def student_parameters(self) -> list[nn.Parameter]:
        """What the optimiser updates: backbone, target head, auxiliary head (not the teacher)."""
        modules = [self.backbone, self.head]
        if self.source_head is not None:
            modules.append(self.source_head)
        return [p for m in modules for p in m.parameters()]

    def configure_optimizers(self) -> dict[str, Any]:
        return self.optimizer_config.build(
            self.student_parameters(), int(self.trainer.estimated_stepping_batches)
        )


def _without_pretrained(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    """``state_dict`` post-hook: drop the pre-trained snapshot (set up again from the source
    model, as every regulariser's state; checkpoints stay the size of the model they train)."""
    for key in [k for k in state_dict if k.startswith(f"{prefix}pretrained.")]:
        del state_dict[key]


def _keep_pretrained(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *hook_args: Any
) -> None:
    """``load_state_dict`` pre-hook: a checkpoint has no snapshot, the module keeps its own."""
    pretrained = getattr(module, "pretrained", None)
    if pretrained is not None:
        for key, value in pretrained.state_dict().items():
            state_dict.setdefault(f"{prefix}pretrained.{key}", value)
