"""Weight- and feature-space regularisers of fine-tuning: L2-SP, BSS and DELTA.

Each penalty is recomputed independently (numpy, explicit loops) on a known input; DELTA's
channel estimate is checked on a tiny model where one channel carries the label, its cache and
its frozen model on the digits CNN; the regularisers go through ``FineTune`` and the method
configs compose.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import hydra
import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_stl.data import SourceTargetDataModule
from lightning_stl.method_module import resolve_regularizers
from lightning_stl.methods import FineTune
from lightning_stl.methods.regularizer_setup import data_key
from lightning_stl.regularizers.base import FineTuneSetup, FineTuneStep, pretrained_snapshot
from lightning_stl.regularizers.bss import BatchSpectralShrinkage
from lightning_stl.regularizers.delta import DELTA, attention_distance
from lightning_stl.regularizers.delta_channels import (
    cache_file,
    channel_attention,
    estimate_loss_increases,
    pooled_features,
)
from lightning_stl.regularizers.l2sp import L2SP

DELTA_TARGET = "lightning_stl.regularizers.delta.DELTA"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> SourceTargetDataModule:
    """The embedded UCI digits, N = 40 training images, no source set."""
    datamodule = SourceTargetDataModule(
        target="digits", source=None, root=tmp_path_factory.mktemp("data"), target_size=40
    )
    datamodule.setup("fit")
    return datamodule


def digits_batch(datamodule: SourceTargetDataModule, size: int = 16) -> tuple[Tensor, Tensor]:
    batch = next(iter(datamodule.eval_loader(datamodule.train_sets["target"])))
    x, y = datamodule.on_after_batch_transfer(batch, 0)
    return x[:size], y[:size]


def bare_setup(
    backbone: nn.Module, head: nn.Linear | None = None, images: tuple[Tensor, Tensor] | None = None
) -> FineTuneSetup:
    """A set-up of a bare backbone: its snapshot as ω⁰, a head, images as batches of 16."""
    head = nn.Linear(backbone.num_features, 2) if head is None else head
    if images is None:
        return FineTuneSetup(backbone, head, pretrained_snapshot(backbone))
    loader = DataLoader(TensorDataset(*images), batch_size=16)

    def target_images(device):
        return ((x.to(device), y.to(device)) for x, y in loader)

    return FineTuneSetup(
        backbone, head, pretrained_snapshot(backbone), None, target_images, len(images[1])
    )


def make_step(inputs: Tensor, features: Tensor | None = None) -> FineTuneStep:
    batch = inputs.shape[0]
    features = torch.zeros(batch, 1) if features is None else features
    return FineTuneStep(
        inputs, inputs, torch.zeros(batch, dtype=torch.long), None, features, features, None
    )


# ---------------------------------------------------------------------------- L2-SP
def test_l2sp_is_the_head_term_at_the_start_and_matches_a_loop_over_parameters():
    torch.manual_seed(0)
    module = FineTune(regularizers=[L2SP(alpha=0.3, beta=0.05)])
    module.setup_regularizers(None)
    l2sp = module.regularizers[0]
    head = [p.detach().double().numpy() for p in module.head.parameters()]
    head_term = 0.5 * 0.05 * sum(float((p**2).sum()) for p in head)

    start = l2sp(make_step(torch.zeros(2, 1, 8, 8))).item()
    assert start == pytest.approx(head_term, rel=1e-5)

    start_weights = {
        n: p.detach().double().numpy().copy() for n, p in module.backbone.named_parameters()
    }
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.backbone.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    distance = 0.0
    for name, p in module.backbone.named_parameters():
        difference = p.detach().double().numpy() - start_weights[name]
        for value in difference.ravel():
            distance += value * value
    expected = 0.5 * 0.3 * distance + head_term
    assert l2sp(make_step(torch.zeros(2, 1, 8, 8))).item() == pytest.approx(expected, rel=1e-5)


def test_l2sp_through_finetune_logs_its_part_and_pulls_the_backbone_back(digits):
    torch.manual_seed(0)
    module = FineTune(regularizers=[L2SP(alpha=0.5, beta=0.0)])
    keys = set(module.state_dict())
    module.setup_regularizers(digits)
    assert set(module.state_dict()) == keys  # the snapshot is not persistent
    reference = module.backbone.conv1.weight.detach().clone()
    with torch.no_grad():
        module.backbone.conv1.weight.add_(1.0)
    x, y = digits_batch(digits)
    loss, parts = module.training_loss(x, y)
    assert set(parts) == {"ce", "l2sp"}
    assert loss.item() == pytest.approx((parts["ce"] + parts["l2sp"]).item(), rel=1e-6)
    (grad,) = torch.autograd.grad(parts["l2sp"], module.backbone.conv1.weight, retain_graph=True)
    # d/dw α/2‖w − w⁰‖² = α (w − w⁰)
    torch.testing.assert_close(grad, 0.5 * (module.backbone.conv1.weight.detach() - reference))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.backbone.parameters())


def test_the_pretrained_snapshot_stays_out_of_checkpoints_and_rebuilding_needs_no_regularizer():
    assert FineTune(regularizers=[BatchSpectralShrinkage()]).pretrained is None  # never read
    module = FineTune(regularizers=[L2SP()])
    assert isinstance(module.pretrained, nn.Module)
    state = module.state_dict()
    assert state and not any(key.startswith("pretrained.") for key in state)
    assert set(state) == set(FineTune().state_dict())
    module.load_state_dict(state)  # strict: the snapshot's keys are not missing
    plain = FineTune(**module.hparams)  # what load_from_checkpoint builds
    assert plain.pretrained is None and len(plain.regularizers) == 0
    plain.load_state_dict(state)
    with pytest.raises(RuntimeError, match="Missing key"):  # other keys are still checked
        module.load_state_dict({k: v for k, v in state.items() if k != "head.bias"})
    outer = nn.ModuleDict({"inner": FineTune(regularizers=[L2SP()])})  # prefixed keys
    outer_state = outer.state_dict()
    assert not any(".pretrained." in key for key in outer_state)
    outer.load_state_dict(outer_state)


def test_l2sp_checks_its_arguments_and_needs_setup():
    with pytest.raises(
        ValueError, match=r"alpha \(α\)=-0\.1 is not allowed: it must be a finite number >= 0"
    ):
        L2SP(alpha=-0.1)
    with pytest.raises(ValueError, match=r"beta \(β\)=-1"):
        L2SP(beta=-1)
    with pytest.raises(RuntimeError, match="call setup"):
        L2SP()(make_step(torch.zeros(1, 1, 8, 8)))


# ---------------------------------------------------------------------------- BSS
@pytest.mark.parametrize("k", [1, 3])
def test_bss_is_eta_times_the_k_smallest_squared_singular_values(k: int):
    features = np.random.default_rng(0).normal(size=(6, 4))
    singular = np.linalg.svd(features, compute_uv=False)  # descending
    expected = 0.002 * sum(sorted(singular)[i] ** 2 for i in range(k))
    tensor = torch.tensor(features, dtype=torch.float32, requires_grad=True)
    penalty = BatchSpectralShrinkage(eta=0.002, k=k)(make_step(torch.zeros(6, 1), tensor))
    assert penalty.item() == pytest.approx(expected, rel=1e-4)
    penalty.backward()
    assert tensor.grad is not None and tensor.grad.abs().sum() > 0


def test_bss_checks_k():
    with pytest.raises(ValueError, match=r"k=0 is not allowed: it must be an integer >= 1"):
        BatchSpectralShrinkage(k=0)
    with pytest.raises(ValueError, match=r"eta \(η\)=-1"):
        BatchSpectralShrinkage(eta=-1)
    bss = BatchSpectralShrinkage(k=3)
    with pytest.raises(ValueError, match=r"k=3 exceeds .* the batch has 2 images"):
        bss(make_step(torch.zeros(2, 1), torch.randn(2, 16)))


# ---------------------------------------------------------------------------- DELTA: the distance
class TinyNet(nn.Module):
    """conv-BN-ReLU (``act1``), strided conv-ReLU (``act2``), mean pooling."""

    def __init__(self, in_chans: int = 2, widths: tuple[int, int] = (3, 4)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(widths[0], widths[1], 3, padding=1, stride=2)
        self.act2 = nn.ReLU()
        self.num_features = widths[1]
        self.feature_info = [{"module": "act1"}, {"module": "act2"}]

    def maps(self, x: Tensor) -> list[Tensor]:
        first = self.act1(self.bn1(self.conv1(x)))
        return [first, self.act2(self.conv2(first))]

    def forward_features(self, x: Tensor) -> Tensor:
        return self.maps(x)[-1]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return x.mean(dim=(2, 3))


def np_distance(student: list[np.ndarray], frozen: list[np.ndarray], weights, form: str) -> float:
    """Σ_j Σ_c W_jc ‖ΔFM_jc‖² per image with explicit loops, then the batch reduction."""
    per_image = np.zeros(student[0].shape[0])
    for s, t, w in zip(student, frozen, weights, strict=True):
        batch, channels, height, width = s.shape
        for b in range(batch):
            for c in range(channels):
                squared = 0.0
                for i in range(height):
                    for j in range(width):
                        squared += (s[b, c, i, j] - t[b, c, i, j]) ** 2
                if form == "official":
                    squared = channels * squared / (height * width)
                per_image[b] += w[c] * squared
    return per_image.mean() if form == "paper" else 0.5 * per_image.sum()


@pytest.mark.parametrize("form", ["paper", "official"])
def test_delta_penalty_matches_a_manual_computation_with_given_channel_weights(form: str):
    torch.manual_seed(0)
    net = TinyNet()
    reference = copy.deepcopy(net).eval()  # w⁰, BatchNorm with running statistics
    head = nn.Linear(4, 5)
    delta = DELTA(alpha=0.7, beta=0.2, form=form)
    delta.bind(bare_setup(net, head))
    assert delta.layer_names == ["act1", "act2"]  # backbone.feature_info
    weights = [torch.tensor([0.2, 0.3, 0.5]), torch.tensor([0.1, 0.2, 0.3, 0.4])]
    delta.set_channel_weights(weights)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(3, 2, 6, 6)
    features = pooled_features(net, x)  # the student's forward (train mode), maps hooked
    penalty = delta(make_step(x, features))

    with torch.no_grad():
        student = [m.double().numpy() for m in net.maps(x)]
        frozen = [m.double().numpy() for m in reference.maps(x)]
    head_term = sum(float((p.detach().double() ** 2).sum()) for p in head.parameters())
    expected = 0.7 * np_distance(student, frozen, [w.numpy() for w in weights], form)
    assert penalty.item() == pytest.approx(expected + 0.5 * 0.2 * head_term, rel=1e-5)
    distance = attention_distance(
        [torch.tensor(s) for s in student], [torch.tensor(t) for t in frozen], weights, form
    )
    assert float(distance) == pytest.approx(expected / 0.7, rel=1e-9)


def np_smile_reg_delta(student, frozen, weights) -> float:
    """``FinetuneDELTA.reg_delta`` of lixingjian/SMILE ``finetune.py``, in numpy, line by line:
    reshape to (b, c, h·w), ``torch.norm(fm_tgt − fm_src, 2, 2)``, ``attention · distance² /
    (h·w)``, ``torch.sum`` over batch and channels, summed over the hooked layers."""
    total = 0.0
    for s, t, w in zip(student, frozen, weights, strict=True):
        b, c, h, wd = s.shape
        distance = np.linalg.norm(s.reshape(b, c, h * wd) - t.reshape(b, c, h * wd), 2, axis=2)
        total += float(np.sum(w[None, :] * distance**2 / (h * wd)))
    return total


def test_delta_smile_official_form_is_smiles_reg_delta():
    """SMILE's code ran DELTA as Σ_batch Σ_c W_c ‖ΔFM_c‖² / (h·w) with no head term: with
    ``form=smile_official`` and ``beta=0`` the penalty is alpha_delta times exactly that."""
    torch.manual_seed(1)
    net = TinyNet()
    reference = copy.deepcopy(net).eval()
    delta = DELTA(alpha=0.01, beta=0.0, form="smile_official")
    delta.bind(bare_setup(net))
    weights = [torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.4, 0.3, 0.2, 0.1])]
    delta.set_channel_weights(weights)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(5, 2, 6, 6)
    features = pooled_features(net, x)
    penalty = delta(make_step(x, features))
    with torch.no_grad():
        student = [m.double().numpy() for m in net.maps(x)]
        frozen = [m.double().numpy() for m in reference.maps(x)]
    expected = 0.01 * np_smile_reg_delta(student, frozen, [w.double().numpy() for w in weights])
    assert penalty.item() == pytest.approx(expected, rel=1e-5)
    # the three forms are three different numbers on the same maps
    values = {
        form: float(
            attention_distance(
                [torch.tensor(m) for m in student], [torch.tensor(m) for m in frozen], weights, form
            )
        )
        for form in ("paper", "official", "smile_official")
    }
    assert len({round(v, 6) for v in values.values()}) == 3


def test_delta_distance_is_zero_for_the_unchanged_model_and_needs_the_students_maps():
    torch.manual_seed(0)
    net = TinyNet()
    delta = DELTA(beta=0.0)
    delta.bind(bare_setup(net))
    delta.set_channel_weights([torch.full((3,), 1 / 3), torch.full((4,), 0.25)])
    net.eval()  # same BatchNorm statistics as the frozen model
    x = torch.randn(2, 2, 6, 6)
    features = pooled_features(net, x)
    assert delta(make_step(x, features)).item() == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():  # evaluation: the student's maps are not kept
        pooled_features(net, x)
    with pytest.raises(RuntimeError, match="no output of layer"):
        delta(make_step(x, features))


def test_delta_channel_weights_must_be_distributions():
    delta = DELTA()
    with pytest.raises(ValueError, match="sum to 1"):
        delta.set_channel_weights([torch.tensor([0.5, 0.6])])
    with pytest.raises(ValueError, match="non-negative"):
        delta.set_channel_weights([torch.tensor([1.5, -0.5])])
    weights = channel_attention([torch.tensor([0.0, 1.0, 3.0]), torch.tensor([2.0, 2.0])])
    torch.testing.assert_close(weights[1], torch.tensor([0.5, 0.5]))  # equal increases: uniform
    z = (np.array([0.0, 1.0, 3.0]) - 4 / 3) / np.std([0.0, 1.0, 3.0])
    expected = np.exp(z / 5) / np.exp(z / 5).sum()
    np.testing.assert_allclose(weights[0].numpy(), expected, rtol=1e-6)


def test_delta_checks_its_arguments():
    for kwargs, message in [
        ({"alpha": -1}, r"alpha \(α\)=-1 is not allowed"),
        ({"beta": -0.5}, r"beta \(β\)=-0.5 is not allowed"),
        ({"layers": "act1"}, "give a list of module names"),
        ({"layers": []}, r"layers=\[\] is not allowed"),
        ({"layers": ["act1", "act1"]}, "more than once"),
        ({"num_images": 0}, "num_images=0 is not allowed"),
        ({"temperature": 0}, "temperature=0 is not allowed"),
        (
            {"form": "tllib"},
            "form='tllib' is not allowed: choose one of paper, official, smile_official",
        ),
    ]:
        with pytest.raises(ValueError, match=message):
            DELTA(**kwargs)
    with pytest.raises(RuntimeError, match="call setup"):
        DELTA()(make_step(torch.zeros(1, 1, 8, 8)))


def test_delta_bad_layer_names_list_the_existing_modules():
    module = FineTune()  # digits_cnn
    with pytest.raises(
        ValueError, match=r"'act9' is not a module .*top-level modules are: conv1, bn1, act1"
    ):
        DELTA(layers=["act1", "act9"]).bind(bare_setup(module.backbone))
    net = nn.Sequential(nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU()))
    with pytest.raises(ValueError, match=r"'0\.5' is not a module .*in '0' are: 0\.0, 0\.1"):
        DELTA(layers=["0.5"]).bind(FineTuneSetup(net, nn.Linear(2, 2), pretrained_snapshot(net)))
    with pytest.raises(ValueError, match="has none: name the layers"):
        DELTA().bind(
            FineTuneSetup(net, nn.Linear(2, 2), pretrained_snapshot(net))
        )  # no feature_info


# ---------------------------------------------------------------------------- DELTA: the estimate
class OneByOne(nn.Module):
    """A 1x1 convolution ``conv`` (identity weights) and mean pooling: features = channel means."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
        self.num_features = channels
        self.feature_info = [{"module": "conv"}]

    def forward_features(self, x: Tensor) -> Tensor:
        return self.conv(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return x.mean(dim=(2, 3))


def test_delta_gives_the_largest_weight_to_the_channel_that_carries_the_label():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(64) % 2
    images = torch.randn(64, 4, 3, 3, generator=generator)  # channels 1-3: noise
    images[:, 0] = (2.0 * labels - 1.0).view(-1, 1, 1) + 0.3 * images[:, 0]  # channel 0: the label
    setup = bare_setup(OneByOne(), nn.Linear(4, 2), (images, labels))
    delta = DELTA(num_images=None)
    delta.setup(setup)
    (weights,) = delta.channel_weights()
    assert weights.shape == (4,) and float(weights.sum()) == pytest.approx(1.0, abs=1e-6)
    assert (weights >= 0).all()
    assert int(weights.argmax()) == 0
    # one outlier among 4 standardises to z = (√3, −1/√3, ...): the largest ratio T = 5 allows
    assert float(weights[0] / weights[1:].max()) == pytest.approx(
        np.exp(4 / np.sqrt(3) / 5), rel=0.02
    )
    (increases,) = estimate_loss_increases(
        setup.pretrained, ["conv"], setup.target_images, 64, 2, num_images=None
    )
    assert float(increases[0]) > 0.5 and float(increases[1:].abs().max()) < 0.05 * float(
        increases[0]
    )


def test_delta_on_finetune_frozen_model_cache_and_state(digits, tmp_path, monkeypatch):
    torch.manual_seed(0)
    conf = {"_target_": DELTA_TARGET, "alpha": 0.5, "cache_dir": str(tmp_path / "cache")}
    module = FineTune(regularizers=[hydra.utils.instantiate(conf)])
    keys = set(module.state_dict())
    rng = torch.get_rng_state()
    module.setup_regularizers(digits)
    assert torch.equal(torch.get_rng_state(), rng)  # the estimate leaves the run's RNG alone
    assert set(module.state_dict()) == keys
    delta = module.regularizers[0]
    assert delta.layer_names == ["act1", "act2", "act3"]
    for weight, channels in zip(delta.channel_weights(), (32, 64, 128), strict=True):
        assert weight.shape == (channels,) and (weight >= 0).all()
        assert float(weight.sum()) == pytest.approx(1.0, abs=1e-5)
    (cached,) = (tmp_path / "cache").glob("delta-*.pt")
    mtime = cached.stat().st_mtime_ns

    # The frozen model: the module's one pre-trained snapshot, no gradients, not optimised,
    # unchanged by training.
    frozen = module.pretrained
    assert delta.require_setup().pretrained is frozen
    frozen_ids = {id(p) for p in frozen.parameters()}
    assert not frozen_ids & {id(p) for p in module.student_parameters()}
    before = copy.deepcopy(frozen.state_dict())
    optimizer = torch.optim.SGD(module.student_parameters(), lr=0.5)
    student_before = module.backbone.conv1.weight.detach().clone()
    x, y = digits_batch(digits)
    for _ in range(3):
        optimizer.zero_grad()
        loss, parts = module.training_loss(x, y)
        assert set(parts) == {"ce", "delta"} and parts["delta"].item() > 0
        loss.backward()
        optimizer.step()
    assert all(not p.requires_grad and p.grad is None for p in frozen.parameters())
    module.train()  # e.g. a user's model.train() after evaluating by hand
    assert module.backbone.training and not frozen.training
    for key, value in frozen.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert not torch.equal(module.backbone.conv1.weight, student_before)
    _, parts = module.training_loss(x, y)
    grads = torch.autograd.grad(
        parts["delta"], list(module.backbone.parameters()), allow_unused=True
    )
    assert any(g is not None and g.abs().sum() > 0 for g in grads)

    # A second set-up on the same source model and data reads the cache.
    torch.manual_seed(0)
    again = FineTune(regularizers=[hydra.utils.instantiate(conf)])
    monkeypatch.setattr("lightning_stl.regularizers.delta.estimate_loss_increases", _not_called)
    again.setup_regularizers(digits)
    assert cached.stat().st_mtime_ns == mtime
    for first, second in zip(
        delta.channel_weights(), again.regularizers[0].channel_weights(), strict=True
    ):
        torch.testing.assert_close(first, second)


def _not_called(*args, **kwargs):
    raise AssertionError("the channel weights should have come from the cache")


# ---------------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("l2sp", {"alpha": 0.01, "beta": 0.01}),
        ("bss", {"eta": 0.001, "k": 1}),
        ("delta", {"alpha": 0.01, "beta": 0.01, "form": "paper", "temperature": 5.0}),
    ],
)
def test_method_configs_compose_with_the_papers_defaults(make_cfg, method: str, expected: dict):
    cfg = make_cfg(f"method={method}")
    assert cfg.method.name == method
    assert cfg.method.module.mixup_alpha is None  # finetune_l2 underneath
    mixup_alpha, (conf,) = resolve_regularizers(cfg.method.regularizers, cfg)
    assert mixup_alpha is None
    regularizer = hydra.utils.instantiate(conf, _convert_="all")
    assert regularizer.name == method
    for key, value in expected.items():
        assert getattr(regularizer, key) == value


def test_delta_cache_key_follows_the_images_transform(tmp_path):
    """File-based sets are decoded through the evaluation transform before the channel estimate:
    a DataModule that resizes otherwise (keep_aspect, resize, crop) gets its own cache file."""
    files = SimpleNamespace(
        labels=torch.tensor([0, 1, 1]), files=np.array(["a.jpg", "b.jpg", "c.jpg"])
    )
    net = TinyNet()

    def path(**transform):
        options = {"resize_size": 256, "crop_size": 224, "keep_aspect": False, **transform}
        key = data_key(SimpleNamespace(**options), files)
        return cache_file(tmp_path, net, ["act1", "act2"], 128, 5, key)

    square = path()
    assert path() == square
    others = {path(keep_aspect=True), path(resize_size=288), path(crop_size=192)}
    assert square not in others and len(others) == 3
