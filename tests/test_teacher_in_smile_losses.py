"""SMILE's L^FE (Eq. 4) and L^FC (Eq. 5) compare the student with the mean TEACHER.

The module's teacher is made to differ from the student (its weights perturbed after
``load_source_model``), the mixup draw (λ, π) is fixed, and the parts ``feature_mixup`` and
``label_mixup`` of ``FineTune.training_loss`` are recomputed in numpy from the teacher's weights
on the clean batch:

    L^FE = mean_i ‖g(B_m)_i − (λ g_T(B)_i + (1 − λ) g_T(B)_{π(i)})‖²
    L^FC = mean_i ‖softmax(z'(B_m))_i − mix(softmax(z_T(B)))_i‖²      (paper form)
    L^FC = mean_i −Σ_k mix(softmax(z_T(B)))_ik log softmax(z'(B_m))_ik  (official form)
    L^FE = ‖G(B_m) − mix(G_T(B))‖_F / (h·w) on the whole batch's maps       (official form)

Using the student's own backbone or source head in place of the teacher gives other values.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import lightning_stl.methods.finetune as finetune_module
from lightning_stl.methods import FineTune
from lightning_stl.models.source_model import SourceModel
from lightning_stl.regularizers import MixupPairs

WEIGHT, PERM = 0.3, [2, 0, 5, 1, 3, 4]
NUM_FEATURES, NUM_SOURCE, NUM_TARGET = 5, 3, 4


class TanhPoolBackbone(nn.Module):
    """1x1 convolution (``forward_features``), then tanh of the spatial mean (``forward_head``)."""

    def __init__(self, in_chans: int = 1, num_features: int = NUM_FEATURES):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, num_features, 1)
        self.num_features = num_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return torch.tanh(x.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x), pre_logits=True)


# ------------------------------------------------------------------ numpy references


def np_pooled(backbone: nn.Module, x: np.ndarray) -> np.ndarray:
    """tanh(mean_hw(W x + b)) of a :class:`TanhPoolBackbone`'s weights, ``[B, F]``."""
    w = backbone.proj.weight.detach().numpy()[:, :, 0, 0]  # [F, C]
    b = backbone.proj.bias.detach().numpy()
    return np.tanh(np.einsum("fc,bchw->bf", w, x) / (x.shape[2] * x.shape[3]) + b)


def np_feature_map(backbone: nn.Module, x: np.ndarray) -> np.ndarray:
    """W x + b per pixel of a :class:`TanhPoolBackbone`, ``[B, F, h, w]`` (before pooling)."""
    w = backbone.proj.weight.detach().numpy()[:, :, 0, 0]
    b = backbone.proj.bias.detach().numpy()
    return np.einsum("fc,bchw->bfhw", w, x) + b[None, :, None, None]


def np_linear(layer: nn.Linear, features: np.ndarray) -> np.ndarray:
    return features @ layer.weight.detach().numpy().T + layer.bias.detach().numpy()


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def np_mix(u: np.ndarray) -> np.ndarray:
    """λ·u_i + (1 − λ)·u_{π(i)}, row by row, with the fixed draw."""
    return np.stack([WEIGHT * u[i] + (1 - WEIGHT) * u[PERM[i]] for i in range(len(u))])


def hand_losses(
    student, teacher_backbone, teacher_head, x: np.ndarray, fc_form: str, fe_form: str = "paper"
):
    """(L^FE, L^FC) of the student on B_m against the given teacher modules on B."""
    pooled = np_pooled(student.backbone, np_mix(x))  # g(B_m)
    teacher_pooled = np_pooled(teacher_backbone, x)  # g_T(B), the clean batch
    if fe_form == "paper":
        fe = np.mean([((pooled[i] - np_mix(teacher_pooled)[i]) ** 2).sum() for i in range(len(x))])
    else:  # the authors' torch.norm(mix(G_T(B)) − G(B_m)) / (h·w) over the whole batch
        difference = np_feature_map(student.backbone, np_mix(x)) - np_mix(
            np_feature_map(teacher_backbone, x)
        )
        fe = np.sqrt((difference**2).sum()) / (x.shape[2] * x.shape[3])
    student_log_p = np_log_softmax(np_linear(student.source_head, pooled))
    target_p = np_mix(np.exp(np_log_softmax(np_linear(teacher_head, teacher_pooled))))
    if fc_form == "paper":
        fc = np.mean(((np.exp(student_log_p) - target_p) ** 2).sum(axis=1))
    else:
        fc = np.mean(-(target_p * student_log_p).sum(axis=1))
    return float(fe), float(fc)


# ------------------------------------------------------------------ the module


def smile_module(monkeypatch, fc_form: str, fe_form: str = "paper") -> FineTune:
    """A SMILE FineTune started from a source model, whose teacher then drifts from the student."""
    monkeypatch.setattr(
        finetune_module,
        "create_backbone",
        lambda name, in_chans=1, **kw: TanhPoolBackbone(in_chans),
    )
    torch.manual_seed(0)
    module = FineTune(
        backbone="tanh_pool",
        in_chans=1,
        num_target_classes=NUM_TARGET,
        num_source_classes=NUM_SOURCE,
        mixup_alpha=0.5,
        feature_mixup_weight=0.3,
        label_mixup_weight=0.7,
        feature_mixup_form=fe_form,
        label_mixup_form=fc_form,
    )
    source_backbone = TanhPoolBackbone(1)
    source = SourceModel(
        backbone=source_backbone.state_dict(),
        classifier={
            "weight": torch.randn(NUM_SOURCE, NUM_FEATURES),
            "bias": torch.randn(NUM_SOURCE),
        },
        origin="a random source model of this test",
    )
    module.load_source_model(source)
    module = module.double()
    # the teacher differs from the student, as after some moving-average updates
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.teacher.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype))
    module.train()
    return module


@pytest.fixture
def fixed_draw(monkeypatch):
    """MixupPairs.draw returns λ = WEIGHT and π = PERM; the calls are counted."""
    calls = []

    def draw(cls, batch_size, *args, **kwargs):
        calls.append(batch_size)
        return cls(WEIGHT, torch.tensor(PERM))

    monkeypatch.setattr(MixupPairs, "draw", classmethod(draw))
    return calls


@pytest.mark.parametrize("form", ["paper", "official"])
def test_feature_and_label_mixup_use_the_teacher_on_the_clean_batch(monkeypatch, fixed_draw, form):
    """L^FE and L^FC equal the numpy values against the teacher, not against the student, in
    the paper's forms and in the authors' code's (L^FE on the whole batch's feature maps)."""
    fc_form = form
    module = smile_module(monkeypatch, fc_form, fe_form=form)
    teacher = module.teacher
    # the perturbed teacher really is another network than the student
    assert not torch.allclose(teacher.backbone.proj.weight, module.backbone.proj.weight)
    assert not torch.allclose(teacher.classifier.weight, module.source_head.weight)

    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 1, 3, 2))
    y = rng.integers(0, NUM_TARGET, size=6)
    loss, parts = module.training_loss(torch.from_numpy(x), torch.from_numpy(y))
    assert fixed_draw == [6]

    fe, fc = hand_losses(module, teacher.backbone, teacher.classifier, x, fc_form, form)
    fe_student, fc_student = hand_losses(
        module, module.backbone, module.source_head, x, fc_form, form
    )
    # the check can tell the teacher from the student
    assert abs(fe - fe_student) > 1e-3 and abs(fc - fc_student) > 1e-3

    assert parts["feature_mixup"].item() == pytest.approx(fe, rel=1e-9), (
        f"L^FE={parts['feature_mixup'].item():.6f}; against the teacher {fe:.6f}, "
        f"against the student itself {fe_student:.6f}"
    )
    assert parts["label_mixup"].item() == pytest.approx(fc, rel=1e-9), (
        f"L^FC={parts['label_mixup'].item():.6f}; against the teacher {fc:.6f}, "
        f"against the student itself {fc_student:.6f}"
    )
    assert loss.item() == pytest.approx(parts["mixup"].item() + 0.3 * fe + 0.7 * fc, rel=1e-9)


def test_the_teacher_outputs_carry_no_gradient_into_the_teacher(monkeypatch, fixed_draw):
    """Back-propagating the SMILE loss reaches the student, never the teacher's weights."""
    module = smile_module(monkeypatch, "paper")
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.normal(size=(6, 1, 3, 2)))
    y = torch.from_numpy(rng.integers(0, NUM_TARGET, size=6))
    loss, _ = module.training_loss(x, y)
    loss.backward()
    assert all(p.grad is None for p in module.teacher.parameters())
    assert module.backbone.proj.weight.grad is not None
    assert module.source_head.weight.grad is not None
