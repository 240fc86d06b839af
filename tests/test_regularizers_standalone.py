"""Every regulariser on its own: built and called on plain tensors and a bare ``nn.Module``.

No LightningModule, Trainer or DataModule: a regulariser is handed a
:class:`~lightning_stl.regularizers.FineTuneSetup` (modules and a batch iterator) once, then sees
a :class:`~lightning_stl.regularizers.FineTuneStep` of tensors. Each value is recomputed here by
hand. The package itself must not load the methods, the data package or Lightning.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_stl.regularizers import (
    DELTA,
    L2SP,
    BatchSpectralShrinkage,
    CoTuning,
    FeatureMixupLoss,
    FineTuneSetup,
    FineTuneStep,
    LabelMixupLoss,
    MixupPairs,
    RegSL,
    Regularizer,
    pretrained_snapshot,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class Bare(nn.Module):
    """conv (``conv``, 2 → 3 channels) and mean pooling: timm's two-part forward, nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.num_features = 3

    def forward_features(self, x: Tensor) -> Tensor:
        return self.conv(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return x.mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


IMAGES = torch.randn(12, 2, 4, 4, generator=torch.Generator().manual_seed(0))
LABELS = torch.arange(12) % 2


def bare_setup(source_head: bool = False) -> FineTuneSetup:
    torch.manual_seed(0)
    backbone = Bare()
    pretrained = pretrained_snapshot(backbone)
    head = nn.Linear(3, 2)
    source = nn.Linear(3, 4) if source_head else None

    def target_images(device: torch.device):
        return ((IMAGES[i : i + 5].to(device), LABELS[i : i + 5].to(device)) for i in (0, 5, 10))

    return FineTuneSetup(
        backbone, head, pretrained, source, target_images, len(LABELS), lambda: "key"
    )


def step_of(setup: FineTuneSetup, epoch: int = 0, pairs: MixupPairs | None = None):
    feature_map = setup.backbone.forward_features(IMAGES)
    features = setup.backbone.forward_head(feature_map)
    logits = setup.head(features)
    return FineTuneStep(IMAGES, IMAGES, LABELS, feature_map, features, logits, pairs, epoch)


def move_backbone(setup: FineTuneSetup) -> None:
    with torch.no_grad():
        setup.backbone.conv.weight.add_(0.1)


def test_l2sp_on_a_bare_backbone():
    setup = bare_setup()
    move_backbone(setup)
    l2sp = L2SP(alpha=0.3, beta=0.05)
    l2sp.setup(setup)
    penalty = l2sp(step_of(setup))
    # by hand: only conv.weight moved, by 0.1 in each of its 3·2·3·3 entries
    distance = 54 * 0.1**2
    head = float(setup.head.weight.detach().pow(2).sum() + setup.head.bias.detach().pow(2).sum())
    assert penalty.item() == pytest.approx(0.5 * 0.3 * distance + 0.5 * 0.05 * head, rel=1e-5)
    assert list(l2sp.state_dict()) == [] and list(l2sp.parameters()) == []


def test_delta_on_a_bare_backbone():
    setup = bare_setup()
    delta = DELTA(alpha=0.5, beta=0.0, layers=["conv"], num_images=None)
    delta.setup(setup)
    (weights,) = delta.channel_weights()
    assert weights.shape == (3,) and float(weights.sum()) == pytest.approx(1.0, abs=1e-6)
    move_backbone(setup)
    step = step_of(setup)  # the student's forward, with gradients: its maps are hooked
    with torch.no_grad():
        difference = setup.backbone.conv(IMAGES) - setup.pretrained.conv(IMAGES)
    expected = (difference.pow(2).sum(dim=(2, 3)) * weights).sum(1).mean()
    torch.testing.assert_close(delta(step), 0.5 * expected)
    assert list(delta.parameters()) == []


def test_bss_on_plain_features():
    setup = bare_setup()
    bss = BatchSpectralShrinkage(eta=0.1, k=2)
    step = step_of(setup)
    singular = torch.linalg.svdvals(step.features.detach().double())
    assert bss(step).item() == pytest.approx(0.1 * float(singular[-2:].pow(2).sum()), rel=1e-5)


def test_cotuning_on_a_bare_backbone():
    setup = bare_setup(source_head=True)
    move_backbone(setup)  # the relationship is the pre-trained model's, not the student's
    cotuning = CoTuning(method="direct", trade_off=2.0)
    cotuning.setup(setup)
    with torch.no_grad():
        source = setup.source_head(setup.pretrained(IMAGES)).softmax(dim=1)
    expected = torch.stack([source[LABELS.eq(c)].mean(0) for c in (0, 1)])
    torch.testing.assert_close(cotuning.relationship, expected, rtol=1e-5, atol=1e-6)
    step = step_of(setup)
    log_probs = F.log_softmax(setup.source_head(step.features), dim=1)
    manual = -(expected[LABELS] * log_probs).sum(1).mean()
    torch.testing.assert_close(cotuning(step), 2.0 * manual, rtol=1e-5, atol=1e-6)


def test_regsl_reads_the_epoch_from_the_step():
    setup = bare_setup()
    regsl = RegSL(correct_epoch=None, reweight_epoch=2, temperature=1.0)
    regsl.setup(setup)
    step = step_of(setup, epoch=0)
    assert regsl(step).item() == pytest.approx(0.0, abs=1e-6)  # epoch 1: plain cross-entropy
    late = step_of(setup, epoch=1)  # epoch 2: re-weighted
    losses = F.cross_entropy(late.logits, LABELS, reduction="none").detach()
    weights = 12 * torch.softmax(-losses / 1.0, dim=0)
    ce = F.cross_entropy(late.logits, LABELS)
    torch.testing.assert_close(ce + regsl(late), (weights * losses).mean())


def test_smile_losses_and_mixup_on_plain_tensors():
    pairs = MixupPairs(0.7, torch.tensor([2, 0, 1]))
    student, teacher = torch.randn(3, 4), torch.randn(3, 4)
    mixed = 0.7 * teacher + 0.3 * teacher[[2, 0, 1]]  # λ·u + (1 − λ)·u[π]
    torch.testing.assert_close(pairs.mix(teacher), mixed)
    expected = (student - mixed).pow(2).sum(1).mean()
    torch.testing.assert_close(FeatureMixupLoss()(student, teacher, pairs), expected)
    soft = 0.7 * teacher.softmax(1) + 0.3 * teacher.softmax(1)[[2, 0, 1]]
    expected = (student.softmax(1) - soft).pow(2).sum(1).mean()
    torch.testing.assert_close(LabelMixupLoss()(student, teacher, pairs), expected)
    labels = torch.tensor([0, 1, 3])
    expected = 0.7 * F.cross_entropy(student, labels) + 0.3 * F.cross_entropy(
        student, labels[[2, 0, 1]]
    )
    torch.testing.assert_close(pairs.cross_entropy(student, labels), expected)


def test_a_regulariser_refers_to_the_set_up_modules_without_owning_them():
    setup = bare_setup(source_head=True)
    for regularizer in (L2SP(), CoTuning(method="direct"), RegSL()):
        regularizer.setup(setup)
        assert regularizer.context is setup
        assert not any(isinstance(m, Bare) for m in regularizer.modules())
    with pytest.raises(RuntimeError, match="L2SP is not set up: call setup"):
        L2SP()(step_of(setup))


def test_every_regulariser_of_the_package_is_covered_here():
    import lightning_stl.regularizers as package

    classes = {
        value
        for value in vars(package).values()
        if isinstance(value, type) and issubclass(value, Regularizer) and value is not Regularizer
    }
    assert classes == {L2SP, DELTA, BatchSpectralShrinkage, CoTuning, RegSL}


def test_the_regularizers_package_loads_no_method_data_or_lightning_module():
    code = (
        "import sys, lightning_stl.regularizers\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('lightning_stl.methods', "
        "'lightning_stl.data', 'lightning_stl.interpolation', 'lightning.')) or m == 'lightning')\n"
        "print(bad)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
