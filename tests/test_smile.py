"""SMILE (Li, Xiong, Dou et al.), Section 3: mixup, L^FE (Eq. 4), L^FC (Eq. 5), Algorithm 1.

Every equation is recomputed here in numpy with explicit loops on a known input, and the
end-to-end runs go through the Hydra entry point with tiny settings.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import timm
import torch
from scipy import stats
from torch import nn

import lightning_stl.methods.finetune as finetune_module
import lightning_stl.stages as stages_module
from lightning_stl.methods import FineTune
from lightning_stl.models import create_backbone
from lightning_stl.regularizers import (
    FeatureMixupLoss,
    LabelMixupLoss,
    MixupPairs,
    check_mixup_alpha,
)
from lightning_stl.run import train
from tests.checkpoint_accuracy import checkpoint_test_accuracy
from tests.conftest import cause_chain, checkpoint_state, final_state

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---------------------------------------------------------------------------- numpy references


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def np_softmax(z: np.ndarray) -> np.ndarray:
    return np.exp(np_log_softmax(z))


def np_mix(u: np.ndarray, weight: float, perm: np.ndarray) -> np.ndarray:
    """Algorithm 1, line 7, one row at a time: λ·u_i + (1 − λ)·u_{π(i)}."""
    out = np.empty_like(u, dtype=np.float64)
    for i in range(len(u)):
        out[i] = weight * u[i] + (1.0 - weight) * u[perm[i]]
    return out


def np_one_hot(y: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros((len(y), k))
    out[np.arange(len(y)), y] = 1.0
    return out


def np_soft_cross_entropy(logits: np.ndarray, targets: np.ndarray) -> float:
    return float(
        np.mean([-(targets[i] * np_log_softmax(logits)[i]).sum() for i in range(len(logits))])
    )


def pairs_of(weight: float, perm: list[int]) -> MixupPairs:
    return MixupPairs(weight, torch.tensor(perm))


# ---------------------------------------------------------------------------- 1. mixup


def test_mix_is_lambda_u_plus_one_minus_lambda_u_shuffled():
    rng = np.random.default_rng(0)
    u = rng.normal(size=(5, 2, 3, 3))
    perm = [3, 0, 4, 1, 2]
    mixed = pairs_of(0.3, perm).mix(torch.from_numpy(u)).numpy()
    expected = np.empty_like(u)
    for i in range(5):
        expected[i] = 0.3 * u[i] + 0.7 * u[perm[i]]
    np.testing.assert_allclose(mixed, expected, rtol=0, atol=1e-14)


def test_mixup_loss_is_cross_entropy_against_the_mixed_one_hot_labels():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 4)) * 3
    y = np.array([0, 3, 1, 1, 2, 3])
    perm = [5, 2, 0, 4, 1, 3]
    weight = 0.35
    loss = pairs_of(weight, perm).cross_entropy(torch.from_numpy(logits), torch.from_numpy(y))
    mixed_labels = np_mix(np_one_hot(y, 4), weight, np.array(perm))
    assert loss.item() == pytest.approx(np_soft_cross_entropy(logits, mixed_labels), rel=1e-12)


def test_fold_keeps_lambda_at_least_one_half_and_is_max_of_the_unfolded_draw():
    for seed in range(200):
        torch.manual_seed(seed)
        plain = MixupPairs.draw(8, 0.2)
        torch.manual_seed(seed)
        folded = MixupPairs.draw(8, 0.2, fold=True)
        assert folded.target_weight >= 0.5
        assert folded.target_weight == max(plain.target_weight, 1 - plain.target_weight)
        assert torch.equal(folded.permutation, plain.permutation)


def test_draws_are_reproducible_under_a_seed_and_the_permutation_is_a_permutation():
    def sequence(seed: int) -> list[tuple[float, list[int]]]:
        torch.manual_seed(seed)
        return [
            (p.target_weight, p.permutation.tolist())
            for p in (MixupPairs.draw(7, 0.4) for _ in range(20))
        ]

    assert sequence(11) == sequence(11)
    assert sequence(11) != sequence(12)
    for _, perm in sequence(11):
        assert sorted(perm) == list(range(7))
    assert MixupPairs.draw(7, 0.4).permutation.dtype == torch.int64


@pytest.mark.parametrize("alpha", [0.2, 2.0])
def test_lambda_follows_beta_alpha_alpha(alpha):
    torch.manual_seed(0)
    draws = np.array([MixupPairs.draw(2, alpha).target_weight for _ in range(20_000)])
    assert draws.min() >= 0 and draws.max() <= 1
    assert draws.mean() == pytest.approx(0.5, abs=0.01)
    assert draws.var() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.05)
    assert stats.kstest(draws, stats.beta(alpha, alpha).cdf).pvalue > 1e-3


def test_folded_lambda_follows_the_folded_beta():
    torch.manual_seed(1)
    draws = np.array([MixupPairs.draw(2, 0.2, fold=True).target_weight for _ in range(20_000)])
    beta = stats.beta(0.2, 0.2)
    assert stats.kstest(draws, lambda x: 2 * beta.cdf(x) - 1).pvalue > 1e-3


@pytest.mark.parametrize("alpha", [0, 0.0, -0.5, True, False, "0.2", None, float("nan")])
def test_bad_alpha_raises_naming_the_value(alpha):
    with pytest.raises(ValueError, match=re.escape(f"alpha={alpha!r}")):
        check_mixup_alpha(alpha)
    with pytest.raises(ValueError, match="alpha="):
        MixupPairs.draw(4, alpha)


def test_infinite_alpha_is_rejected():
    with pytest.raises(ValueError, match="alpha=inf"):
        check_mixup_alpha(float("inf"))


def test_good_alpha_is_returned_as_a_float():
    assert check_mixup_alpha(1) == 1.0 and isinstance(check_mixup_alpha(1), float)
    assert check_mixup_alpha(0.2) == 0.2


# ---------------------------------------------------------------------------- 2. L_FE and L_FC


def test_feature_mixup_paper_form_is_eq4_on_pooled_features():
    rng = np.random.default_rng(2)
    s, t = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    perm, weight = [2, 4, 1, 0, 3], 0.8
    loss = FeatureMixupLoss()(torch.from_numpy(s), torch.from_numpy(t), pairs_of(weight, perm))
    expected = np.mean(
        [
            sum(
                (s[i, f] - (weight * t[i, f] + (1 - weight) * t[perm[i], f])) ** 2 for f in range(7)
            )
            for i in range(5)
        ]
    )
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def np_official_feature_mixup(s: np.ndarray, t: np.ndarray, weight: float, perm) -> float:
    """The authors' finetune.py, line 305, with explicit loops: ``torch.norm(mix(t) - s) / (h*w)``
    is the square root of the sum of squares over every element of the batch."""
    b, c, h, w = s.shape
    total = 0.0
    for i in range(b):
        for k in range(c):
            for u in range(h):
                for v in range(w):
                    mixed = weight * t[i, k, u, v] + (1 - weight) * t[perm[i], k, u, v]
                    total += (mixed - s[i, k, u, v]) ** 2
    return float(np.sqrt(total) / (h * w))


def test_feature_mixup_official_form_is_the_whole_batch_frobenius_norm_over_h_times_w():
    rng = np.random.default_rng(3)
    b, c, h, w = 4, 3, 2, 5  # h != w, so h·h or w·w would fail
    s, t = rng.normal(size=(b, c, h, w)), rng.normal(size=(b, c, h, w))
    perm, weight = [1, 3, 0, 2], 0.6
    loss = FeatureMixupLoss("official")(
        torch.from_numpy(s), torch.from_numpy(t), pairs_of(weight, perm)
    )
    expected = np_official_feature_mixup(s, t, weight, perm)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # neither squared nor averaged over the batch: the paper-style per-image mean is far off
    paper_style = np.mean(
        [
            ((s[i] - (weight * t[i] + (1 - weight) * t[perm[i]])) ** 2).sum() / (h * w)
            for i in range(b)
        ]
    )
    assert abs(loss.item() - paper_style) > 0.1 * paper_style
    assert FeatureMixupLoss("official").uses_feature_map
    assert not FeatureMixupLoss("paper").uses_feature_map


def test_feature_mixup_official_form_grows_as_the_root_of_the_batch_size():
    """Stacking a batch k times multiplies the whole-batch Frobenius norm by √k (a batch mean
    would not change, a squared norm would grow k times)."""
    rng = np.random.default_rng(8)
    s, t = rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(2, 3, 4, 4))
    one = FeatureMixupLoss("official")(
        torch.from_numpy(s), torch.from_numpy(t), pairs_of(1.0, [0, 1])
    )
    four = FeatureMixupLoss("official")(
        torch.from_numpy(np.concatenate([s] * 4)),
        torch.from_numpy(np.concatenate([t] * 4)),
        pairs_of(1.0, list(range(8))),
    )
    assert four.item() == pytest.approx(2.0 * one.item(), rel=1e-12)


def test_label_mixup_paper_form_is_the_squared_distance_of_softmax_outputs():
    rng = np.random.default_rng(4)
    s, t = rng.normal(size=(5, 6)) * 2, rng.normal(size=(5, 6)) * 2
    perm, weight = [4, 3, 2, 1, 0], 0.25
    loss = LabelMixupLoss()(torch.from_numpy(s), torch.from_numpy(t), pairs_of(weight, perm))
    ps, pt = np_softmax(s), np_softmax(t)
    expected = np.mean(
        [((ps[i] - (weight * pt[i] + (1 - weight) * pt[perm[i]])) ** 2).sum() for i in range(5)]
    )
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_label_mixup_official_form_is_soft_cross_entropy_against_mixed_teacher_probabilities():
    rng = np.random.default_rng(5)
    s, t = rng.normal(size=(5, 6)) * 2, rng.normal(size=(5, 6)) * 2
    perm, weight = [1, 2, 3, 4, 0], 0.55
    loss = LabelMixupLoss("official")(
        torch.from_numpy(s), torch.from_numpy(t), pairs_of(weight, perm)
    )
    expected = np_soft_cross_entropy(s, np_mix(np_softmax(t), weight, np.array(perm)))
    assert loss.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("loss", "shape"),
    [
        (FeatureMixupLoss("paper"), (4, 6)),
        (FeatureMixupLoss("official"), (4, 3, 2, 2)),
        (LabelMixupLoss("paper"), (4, 6)),
        (LabelMixupLoss("official"), (4, 6)),
    ],
)
def test_teacher_inputs_get_no_gradient_and_the_student_gradient_is_right(loss, shape):
    torch.manual_seed(0)
    student = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    pairs = pairs_of(0.7, [2, 0, 3, 1])
    loss(student, teacher, pairs).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0
    if isinstance(loss, FeatureMixupLoss):
        difference = student.detach() - pairs.mix(teacher.detach())
        if loss.form == "paper":  # d/ds mean_i ‖s_i − e_i‖² = 2 (s − e) / B
            torch.testing.assert_close(student.grad, 2 * difference / 4)
        else:  # d/ds ‖s − e‖_F / (h·w) = (s − e) / (‖s − e‖_F · h·w)
            norm = difference.pow(2).sum().sqrt()
            scale = shape[2] * shape[3]
            torch.testing.assert_close(student.grad, difference / (norm * scale))


def test_shape_mismatch_and_bad_form_raise():
    pairs = pairs_of(0.5, [1, 0])
    with pytest.raises(ValueError, match=r"differ in shape: \(2, 3\) vs \(2, 4\)"):
        FeatureMixupLoss()(torch.zeros(2, 3), torch.zeros(2, 4), pairs)
    with pytest.raises(ValueError, match=r"differ in shape"):
        LabelMixupLoss()(torch.zeros(2, 3), torch.zeros(2, 4), pairs)
    with pytest.raises(ValueError, match=r"feature map \[B, C, h, w\]"):
        FeatureMixupLoss("official")(torch.zeros(2, 3), torch.zeros(2, 3), pairs)
    with pytest.raises(ValueError, match=r"form='offical'.*paper, official"):
        FeatureMixupLoss("offical")
    with pytest.raises(ValueError, match=r"form='Paper'"):
        LabelMixupLoss("Paper")


# ---------------------------------------------------------------------------- 3. one λ for all


class AffineBackbone(nn.Module):
    """A 1x1 convolution and mean pooling: g(mix(x)) = mix(g(x)) exactly (λ + (1 − λ) = 1)."""

    def __init__(self, in_chans: int = 1, num_features: int = 5):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, num_features, 1)
        self.num_features = num_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x), pre_logits=True)


def affine_finetune(monkeypatch, **kwargs) -> FineTune:
    monkeypatch.setattr(
        finetune_module, "create_backbone", lambda name, in_chans=1, **kw: AffineBackbone(in_chans)
    )
    torch.manual_seed(0)
    options = {
        "num_target_classes": 4,
        "num_source_classes": 3,
        "mixup_alpha": 0.5,
        "feature_mixup_weight": 0.3,
        "label_mixup_weight": 0.7,
        **kwargs,
    }
    module = FineTune(backbone="digits_cnn", in_chans=1, **options).double()
    module.train()
    return module


def record_draws(monkeypatch) -> list[MixupPairs]:
    draws: list[MixupPairs] = []
    original = MixupPairs.draw.__func__

    def spy(cls, *args, **kwargs):
        pairs = original(cls, *args, **kwargs)
        draws.append(pairs)
        return pairs

    monkeypatch.setattr(MixupPairs, "draw", classmethod(spy))
    return draws


def np_features(module: FineTune, x: np.ndarray, feature_map: bool = False) -> np.ndarray:
    """The affine backbone in numpy: W x + b per pixel, then the spatial mean."""
    w = module.backbone.proj.weight.detach().numpy()[:, :, 0, 0]  # [F, C]
    b = module.backbone.proj.bias.detach().numpy()
    fmap = np.einsum("fc,bchw->bfhw", w, x) + b[None, :, None, None]
    return fmap if feature_map else fmap.mean(axis=(2, 3))


def np_linear(layer: nn.Linear, features: np.ndarray) -> np.ndarray:
    return features @ layer.weight.detach().numpy().T + layer.bias.detach().numpy()


@pytest.mark.parametrize(("fe_form", "fc_form"), [("paper", "paper"), ("official", "official")])
def test_one_lambda_and_one_shuffle_for_inputs_labels_features_and_outputs(
    monkeypatch, fe_form, fc_form
):
    module = affine_finetune(
        monkeypatch,
        feature_mixup_form=fe_form,
        label_mixup_form=fc_form,
        fold_mixup_weight=fe_form == "official",
    )
    draws = record_draws(monkeypatch)
    rng = np.random.default_rng(6)
    checked_shuffles = 0
    for seed in range(4):
        x = rng.normal(size=(6, 1, 3, 2))
        y = rng.integers(0, 4, size=6)
        torch.manual_seed(seed)
        loss, parts = module.training_loss(torch.from_numpy(x), torch.from_numpy(y))
        assert len(draws) == seed + 1, "one draw of (λ, π) per step"
        weight, perm = draws[-1].target_weight, draws[-1].permutation.numpy()
        if fe_form == "official":
            assert weight >= 0.5
        checked_shuffles += int((perm != np.arange(6)).any())
        mixed = np_mix(x, weight, perm)  # B_m
        # L_FE: the teacher (= the student here) sees the clean batch; linear g, so exactly 0
        # iff inputs and features are mixed with the same λ and π
        feature_map = fe_form == "official"
        student = np_features(module, mixed, feature_map)
        teacher = np_mix(np_features(module, x, feature_map), weight, perm)
        if feature_map:  # the whole batch's Frobenius norm / (h·w): float64 rounding ~1e-16
            fe = np.sqrt(((student - teacher) ** 2).sum()) / (student.shape[2] * student.shape[3])
            assert fe < 1e-12
            assert parts["feature_mixup"].item() == pytest.approx(fe, abs=1e-12)
        else:
            fe = np.mean([((student[i] - teacher[i]) ** 2).sum() for i in range(6)])
            assert fe < 1e-20
            assert parts["feature_mixup"].item() == pytest.approx(fe, abs=1e-20)
        other = np_mix(np_features(module, x, feature_map), 1 - weight, perm)
        assert np.mean((student - other) ** 2) > 1e-6  # another λ would show
        # L_MXP against λ·onehot(y) + (1 − λ)·onehot(y[π])
        pooled = np_features(module, mixed)
        logits = np_linear(module.head, pooled)
        mxp = np_soft_cross_entropy(logits, np_mix(np_one_hot(y, 4), weight, perm))
        assert parts["mixup"].item() == pytest.approx(mxp, rel=1e-10)
        # L_FC: the auxiliary head on B_m against the mixed teacher outputs on B
        source = np_linear(module.source_head, pooled)
        mixed_probs = np_mix(
            np_softmax(np_linear(module.source_head, np_features(module, x))), weight, perm
        )
        if fc_form == "paper":
            fc = np.mean([((np_softmax(source)[i] - mixed_probs[i]) ** 2).sum() for i in range(6)])
        else:
            fc = np_soft_cross_entropy(source, mixed_probs)
        assert parts["label_mixup"].item() == pytest.approx(fc, rel=1e-10)
        assert loss.item() == pytest.approx(mxp + 0.3 * fe + 0.7 * fc, rel=1e-10)
    assert checked_shuffles >= 3


def test_without_mixup_the_loss_is_plain_cross_entropy_and_nothing_is_drawn(monkeypatch):
    module = affine_finetune(
        monkeypatch, mixup_alpha=None, feature_mixup_weight=0.0, label_mixup_weight=0.0
    )
    draws = record_draws(monkeypatch)
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(5, 1, 2, 2)), rng.integers(0, 4, size=5)
    loss, parts = module.training_loss(torch.from_numpy(x), torch.from_numpy(y))
    logits = np_linear(module.head, np_features(module, x))
    assert set(parts) == {"ce"} and not draws
    assert loss.item() == pytest.approx(np_soft_cross_entropy(logits, np_one_hot(y, 4)), rel=1e-10)
    assert module.teacher is None and module.source_head is None


def test_ablations_compute_only_their_terms(monkeypatch):
    x, y = torch.randn(4, 1, 2, 2, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    no_fe = affine_finetune(monkeypatch, feature_mixup_weight=0.0)
    assert set(no_fe.training_loss(x, y)[1]) == {"mixup", "label_mixup"}
    no_fc = affine_finetune(monkeypatch, label_mixup_weight=0.0, num_source_classes=None)
    assert set(no_fc.training_loss(x, y)[1]) == {"mixup", "feature_mixup"}
    assert no_fc.source_head is None and no_fc.teacher.classifier is None
    mixup = affine_finetune(monkeypatch, feature_mixup_weight=0.0, label_mixup_weight=0.0)
    assert set(mixup.training_loss(x, y)[1]) == {"mixup"} and mixup.teacher is None


def test_finetune_rejects_inconsistent_settings():
    with pytest.raises(ValueError, match=r"needs mixup_alpha > 0, got mixup_alpha=null"):
        FineTune(mixup_alpha=None, feature_mixup_weight=0.1)
    with pytest.raises(ValueError, match=r"label_mixup_weight \(γ_FC\)=0.1 > 0 needs.*classifier"):
        FineTune(mixup_alpha=0.2, label_mixup_weight=0.1, num_source_classes=None)
    with pytest.raises(ValueError, match=r"feature_mixup_weight \(γ_FE\)=-1 is not allowed"):
        FineTune(mixup_alpha=0.2, feature_mixup_weight=-1)
    with pytest.raises(ValueError, match=r"alpha=0 is not allowed"):
        FineTune(mixup_alpha=0)


# ---------------------------------------------------------------------------- 7. bad config input


@pytest.fixture
def source_file(tmp_path: Path) -> Path:
    """A timm-style state dict of digits_cnn with its 10-way ``fc`` (a pre-trained model)."""
    torch.manual_seed(0)
    path = tmp_path / "digits_cnn_source.pth"
    torch.save(timm.create_model("digits_cnn", num_classes=10).state_dict(), path)
    return path


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        (
            "method.module.feature_mixup_weight=-0.1",
            r"feature_mixup_weight \(γ_FE\)=-0.1 is not allowed",
        ),
        ("method.module.label_mixup_weight=-2", r"label_mixup_weight \(γ_FC\)=-2 is not allowed"),
        ("method.module.mixup_alpha=0", r"mixup alpha=0 is not allowed"),
        ("method.module.mixup_alpha=-1.5", r"mixup alpha=-1.5 is not allowed"),
        ("method.module.feature_mixup_form=pape", r"form='pape' is not allowed"),
        ("optimizer.milestones=[1.5]", r"optimizer.milestones=\[1.5\] is not allowed"),
    ],
)
def test_bad_smile_settings_stop_before_training(make_cfg, source_file, override, pattern):
    cfg = make_cfg(
        "method=smile", f"backbone.weights={source_file}", "optimizer=sgd_step", override
    )
    with pytest.raises(Exception) as info:
        train(cfg)
    chain = cause_chain(info.value)
    assert any(isinstance(e, ValueError) for e in chain)
    assert any(re.search(pattern, str(e)) for e in chain), [str(e) for e in chain]
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


def test_bad_smile_settings_stop_before_the_source_pretraining(make_cfg, tmp_path):
    cache = tmp_path / "cache"
    cfg = make_cfg(
        "+experiment=digits_smile",
        "pretraining.epochs=1",
        f"pretraining.cache_dir={cache}",
        "method.module.feature_mixup_weight=-0.1",
    )
    with pytest.raises(Exception) as info:
        train(cfg)
    assert any("-0.1" in str(e) for e in cause_chain(info.value))
    assert not cache.exists() or not any(cache.iterdir()), "the source pre-training ran first"


@pytest.mark.parametrize(
    ("method", "pattern"),
    [
        # γ_FC > 0 needs a source classifier; none without a source model
        ("smile", r"(?s)label_mixup_weight.*classifier.*backbone.weights"),
        # γ_FE > 0 alone: the teacher needs a pre-trained model
        ("smile_no_fc", r"regularises towards a pre-trained model.*pretraining.on_source=true"),
    ],
)
def test_smile_without_a_pretrained_source_raises(make_cfg, method, pattern):
    cfg = make_cfg(f"method={method}", "pretraining.on_source=false", "backbone.weights=null")
    with pytest.raises(Exception) as info:
        train(cfg)
    chain = cause_chain(info.value)
    assert any(isinstance(e, ValueError) and re.search(pattern, str(e)) for e in chain), [
        str(e) for e in chain
    ]
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


def test_a_classifier_free_source_file_with_label_mixup_raises(make_cfg, tmp_path):
    path = tmp_path / "backbone_only.pth"
    torch.save(timm.create_model("digits_cnn", num_classes=0).state_dict(), path)
    cfg = make_cfg("method=smile", f"backbone.weights={path}")
    with pytest.raises(Exception) as info:
        train(cfg)
    assert any(
        isinstance(e, ValueError) and "classifier" in str(e) for e in cause_chain(info.value)
    )


# ---------------------------------------------------------------------------- 8. end to end

#: SMILE on the embedded digits in seconds: one epoch of source pre-training (7 steps of 64 of
#: the 400 rendered digits), six fine-tuning steps on N = 30, validation every two steps.
SMILE_TINY = [
    "+experiment=digits_smile",
    "pretraining.epochs=1",
    "steps.finetune=6",
    "data.target_size=30",
    "val_every_n_steps=2",
    "trainer.log_every_n_steps=1",
]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One source pre-training for the end-to-end tests of this module that do not count it."""
    return tmp_path_factory.mktemp("pretrained")


def pretrained_checkpoints(cache: Path) -> list[Path]:
    return sorted(cache.glob("*/checkpoints/source/last.ckpt"))


def final_target_state(cfg) -> dict[str, torch.Tensor]:
    return final_state(Path(cfg.paths.output_dir), "target")


def logged_columns(cfg) -> set[str]:
    path = Path(cfg.paths.output_dir) / "csv" / "target" / "metrics.csv"
    return set(path.read_text().splitlines()[0].split(","))


def logged_rows(cfg, column: str) -> list[dict[str, float]]:
    """The rows of the fine-tuning's ``metrics.csv`` that logged ``column``, as numbers."""
    path = Path(cfg.paths.output_dir) / "csv" / "target" / "metrics.csv"
    with path.open() as handle:
        rows = [r for r in csv.DictReader(handle) if r[column]]
    return [{k: float(v) for k, v in r.items() if v} for r in rows]


def test_digits_smile_runs_and_a_second_run_reuses_the_cached_pretraining(
    make_cfg, tmp_path, caplog
):
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="lightning_stl")
    first = make_cfg(*SMILE_TINY, f"pretraining.cache_dir={cache}", output_dir=tmp_path / "smile")
    metrics = train(first)
    written = json.loads((tmp_path / "smile" / "metrics.json").read_text())
    assert written["method"] == "smile" and written["status"] == "ok"
    assert 0.0 <= written["test_acc"] <= 1.0 and written["test_acc"] == metrics["test_acc"]
    assert written["total_steps"] == 6 and written["target_size"] == 30
    (source_ckpt,) = pretrained_checkpoints(cache)
    mtime = source_ckpt.stat().st_mtime_ns
    assert "pre-training on the source" in caplog.text
    assert "source pre-training cached" not in caplog.text
    assert {"train/loss_mixup", "train/loss_feature_mixup", "train/loss_label_mixup"} <= (
        logged_columns(first)
    )

    # the fine-tuning started from the pre-trained model and the teacher moved (decay 0.999 < 1)
    source, final = checkpoint_state(source_ckpt), final_target_state(first)
    backbone = [k[len("model.backbone.") :] for k in source if k.startswith("model.backbone.")]
    assert backbone
    moved = [
        k
        for k in backbone
        if source[f"model.backbone.{k}"].is_floating_point()
        and not torch.equal(final[f"teacher.backbone.{k}"], source[f"model.backbone.{k}"])
    ]
    assert len(moved) == sum(source[f"model.backbone.{k}"].is_floating_point() for k in backbone)
    for k in backbone:  # ... but it stayed close to it: 6 steps of (1 − 0.999)
        a, b = final[f"teacher.backbone.{k}"].double(), source[f"model.backbone.{k}"].double()
        assert (a - b).abs().max() <= (final[f"backbone.{k}"].double() - b).abs().max() + 1e-12
    assert not torch.equal(final["teacher.classifier.weight"], source["model.source_head.weight"])

    caplog.clear()
    second = make_cfg(
        *SMILE_TINY,
        f"pretraining.cache_dir={cache}",
        "method=mixup",
        "seed=1",
        output_dir=tmp_path / "mixup",
    )
    again = train(second)
    assert again["method"] == "mixup" and again["total_steps"] == 6
    # vanilla mixup: the mixup cross-entropy is the whole loss, no SMILE term
    rows = logged_rows(second, "train/loss")
    assert len(rows) == 6 and all(r["train/loss"] == r["train/loss_mixup"] for r in rows)
    assert not {"train/loss_feature_mixup", "train/loss_label_mixup"} & logged_columns(second)
    assert pretrained_checkpoints(cache) == [source_ckpt]
    assert source_ckpt.stat().st_mtime_ns == mtime
    assert "source pre-training cached" in caplog.text
    assert "pre-training on the source" not in caplog.text
    assert not any(k.startswith("teacher.") for k in final_target_state(second))


@pytest.mark.parametrize(
    ("method", "logged", "not_logged"),
    [
        ("smile_official", {"train/loss_feature_mixup", "train/loss_label_mixup"}, set()),
        ("smile_no_fe", {"train/loss_label_mixup"}, {"train/loss_feature_mixup"}),
        ("smile_no_fc", {"train/loss_feature_mixup"}, {"train/loss_label_mixup"}),
    ],
)
def test_official_form_and_ablations_run(make_cfg, shared_cache, method, logged, not_logged):
    cfg = make_cfg(*SMILE_TINY, f"pretraining.cache_dir={shared_cache}", f"method={method}")
    metrics = train(cfg)
    assert metrics["method"] == method and metrics["total_steps"] == 6
    columns = logged_columns(cfg)
    assert logged <= columns and not (not_logged & columns)
    # at every step the loss is L^MXP + γ_FE·L^FE + γ_FC·L^FC with the method's γ: the ablated
    # term is not added unlogged, the kept ones are positive
    gamma = {
        "train/loss_feature_mixup": cfg.method.module.feature_mixup_weight,
        "train/loss_label_mixup": cfg.method.module.label_mixup_weight,
    }
    rows = logged_rows(cfg, "train/loss")
    assert len(rows) == 6
    for row in rows:
        assert all(row[name] > 0 for name in logged)
        expected = row["train/loss_mixup"] + sum(gamma[name] * row[name] for name in logged)
        assert row["train/loss"] == pytest.approx(expected, rel=1e-5)
    state = final_target_state(cfg)
    (source_ckpt,) = pretrained_checkpoints(shared_cache)
    source = checkpoint_state(source_ckpt)
    if method == "smile_no_fc":
        assert not any(k.startswith(("source_head.", "teacher.classifier.")) for k in state)
    if method == "smile_official":
        # updates inside steps 0, 10...: step 0's is a no-op (the student is the teacher), so
        # after 6 steps the teacher is still the pre-trained model
        for k, v in state.items():
            if k.startswith("teacher.backbone."):
                assert torch.equal(v, source["model." + k[len("teacher.") :]]), k


class EndState(L.Callback):
    """The module's state when ``fit`` ends (``last.ckpt`` may hold an earlier best step)."""

    state: dict[str, torch.Tensor] = {}

    def on_fit_end(self, trainer, pl_module):
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


@pytest.mark.parametrize("steps", [10, 12])
def test_the_official_teacher_moves_inside_step_10_and_keeps_the_pretrained_statistics(
    make_cfg, shared_cache, monkeypatch, steps
):
    """``smile_official`` in a real run: after 10 steps (updates inside steps 0..9: only step 0's,
    a no-op) the teacher is exactly the pre-trained model; after 12, one update with decay 0.999
    happened (inside step 10), of the parameters only: the BatchNorm statistics stay the source's
    while the student's moved."""
    end = EndState()
    original = stages_module.stage_callbacks
    monkeypatch.setattr(stages_module, "stage_callbacks", lambda *args: [*original(*args), end])
    cfg = make_cfg(
        *SMILE_TINY,
        f"pretraining.cache_dir={shared_cache}",
        "method=smile_official",
        f"steps.finetune={steps}",
    )
    assert train(cfg)["total_steps"] == steps
    (source_ckpt,) = pretrained_checkpoints(shared_cache)
    source = checkpoint_state(source_ckpt)
    parameters = {n for n, _ in create_backbone("digits_cnn", in_chans=1).named_parameters()}
    moved, travelled = 0.0, 0.0
    for key, teacher in end.state.items():
        if not key.startswith("teacher.backbone."):
            continue
        name = key[len("teacher.backbone.") :]
        pretrained, student = source[f"model.backbone.{name}"], end.state[f"backbone.{name}"]
        if name not in parameters:  # running statistics and counters: never averaged
            assert torch.equal(teacher, pretrained), key
            if name.endswith("running_mean"):
                assert not torch.equal(student, pretrained), key
            continue
        if steps == 10:
            assert torch.equal(teacher, pretrained), key
        moved += float((teacher.double() - pretrained.double()).pow(2).sum())
        travelled += float((student.double() - pretrained.double()).pow(2).sum())
    if steps == 12:  # ≈ 0.001 of the way to the student before step 10 (the student of step 12)
        assert 0.0005 < (moved / travelled) ** 0.5 < 0.0015


def test_a_teacher_with_decay_one_stays_the_pretrained_model(make_cfg, shared_cache):
    cfg = make_cfg(
        *SMILE_TINY,
        f"pretraining.cache_dir={shared_cache}",
        "method.callbacks.mean_teacher.decay=1.0",
    )
    train(cfg)
    state = final_target_state(cfg)
    (source_ckpt,) = pretrained_checkpoints(shared_cache)
    source = checkpoint_state(source_ckpt)
    teacher = {k: v for k, v in state.items() if k.startswith("teacher.")}
    assert teacher
    for key, value in teacher.items():
        name = key.replace("teacher.backbone.", "model.backbone.").replace(
            "teacher.classifier.", "model.source_head."
        )
        if value.is_floating_point():
            assert torch.equal(value, source[name]), key
    # the student did train
    assert not torch.equal(state["backbone.conv1.weight"], source["model.backbone.conv1.weight"])


def test_the_same_seed_gives_the_same_run_whether_the_pretraining_is_cached_or_not(
    make_cfg, tmp_path, caplog
):
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="lightning_stl")
    fresh = make_cfg(*SMILE_TINY, f"pretraining.cache_dir={cache}", output_dir=tmp_path / "a")
    cached = make_cfg(*SMILE_TINY, f"pretraining.cache_dir={cache}", output_dir=tmp_path / "b")
    a = train(fresh)
    assert "pre-training on the source" in caplog.text
    caplog.clear()
    b = train(cached)
    # two paths: the first run pre-trained in this process, the second only read the cache
    assert "source pre-training cached" in caplog.text
    assert "pre-training on the source" not in caplog.text
    state_a, state_b = final_target_state(fresh), final_target_state(cached)
    assert [k for k in state_a if not torch.equal(state_a[k], state_b[k])] == []
    assert a["test_acc"] == b["test_acc"]


def test_pretraining_on_source_refuses_per_domain_batchnorm_before_training(make_cfg, tmp_path):
    cache = tmp_path / "cache"
    cfg = make_cfg(*SMILE_TINY, f"pretraining.cache_dir={cache}", "batchnorm=per_domain")
    with pytest.raises(ValueError, match="batchnorm=shared, got batchnorm='per_domain'"):
        train(cfg)
    assert not cache.exists()  # nothing was pre-trained


def test_a_run_shorter_than_the_validation_period_is_still_tested(make_cfg, shared_cache):
    cfg = make_cfg(
        "+experiment=digits_smile",
        "pretraining.epochs=1",
        "steps.finetune=6",
        "data.target_size=30",
        f"pretraining.cache_dir={shared_cache}",
    )
    # digits_smile validates every 10 steps; a 6-step run must still validate and test a model
    assert cfg.val_every_n_steps > 6
    metrics = train(cfg)
    # one validation, of the final model (after step 6), and that checkpoint is the one tested
    (validation,) = logged_rows(cfg, "val/acc")
    assert validation["step"] == 5  # Lightning's 0-based step of the 6th optimiser step
    assert metrics["best_val_acc"] == pytest.approx(validation["val/acc"], abs=1e-7)
    best = metrics["stages"][-1]["best_model_path"]
    assert torch.load(best, map_location="cpu", weights_only=True)["global_step"] == 6
    assert metrics["best_step"] == 6
    assert metrics["test_acc"] == pytest.approx(
        checkpoint_test_accuracy(cfg, best, FineTune), abs=1e-6
    )


@pytest.mark.parametrize("form", ["paper", "official"])
def test_the_mixup_losses_are_summed_in_float32_under_bf16(form):
    """Under bf16 autocast the features and logits come in bf16; L^FE and L^FC sum hundreds of
    terms and are computed in float32 (bf16 keeps 8 bits: its sums would be off by ~1e-2)."""
    generator = torch.Generator().manual_seed(0)
    pairs = MixupPairs(0.3, torch.tensor([3, 0, 1, 2]))
    for loss, shape in [
        (FeatureMixupLoss(form), (4, 512, 2, 2)),
        (LabelMixupLoss(form), (4, 1000)),
    ]:
        student, teacher = (torch.randn(*shape, generator=generator).bfloat16() for _ in "st")
        value = loss(student, teacher, pairs)
        exact = loss(student.double(), teacher.double(), pairs)
        assert value.dtype == torch.float32
        assert value.item() == pytest.approx(exact.item(), rel=1e-5), type(loss)
