"""Backbones: architecture sizes, timm interface, create_backbone and pretrained files."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import lightning_stl.models as models
from lightning_stl.models import PretrainedFileError, create_backbone, list_backbones
from lightning_stl.models.resnet_cifar import ZeroPadShortcut, resnet_cifar
from lightning_stl.models.wide_resnet import WideBasicBlock

PROJECT = ["digits_cnn", "resnet20", "resnet32", "resnet56", "wrn10_2", "wrn16_4", "wrn28_10"]
NUM_FEATURES = {
    "digits_cnn": 128,
    "resnet20": 64,
    "resnet32": 64,
    "resnet56": 64,
    "wrn10_2": 128,
    "wrn16_4": 256,
    "wrn28_10": 640,
}
# too slow for a real forward pass on a CPU in the fast suite: shapes are checked on the meta device
HEAVY = {"wrn28_10"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv(c_in: int, c_out: int, k: int) -> int:
    return c_in * c_out * k * k


def bn(c: int) -> int:
    return 2 * c  # scale and shift (running statistics are buffers)


def cifar_resnet_params(depth: int, shortcut: str, in_chans: int = 3, classes: int = 10) -> int:
    """He et al. 2016, Sec. 4.2, counted by hand: 3x3 conv 16, 3 stages x n blocks, linear."""
    n = (depth - 2) // 6
    total = conv(in_chans, 16, 3) + bn(16)
    c_in = 16
    for width in (16, 32, 64):
        for _ in range(n):
            total += conv(c_in, width, 3) + bn(width) + conv(width, width, 3) + bn(width)
            if shortcut == "B" and c_in != width:
                total += conv(c_in, width, 1) + bn(width)
            c_in = width
    return total + 64 * classes + classes


def wrn_params(depth: int, k: int, in_chans: int = 3, classes: int = 10) -> int:
    """Zagoruyko & Komodakis 2016: conv 16, 3 stages x n pre-activation blocks, BN, linear."""
    n = (depth - 4) // 6
    total = conv(in_chans, 16, 3)
    c_in = 16
    for width in (16 * k, 32 * k, 64 * k):
        for _ in range(n):
            total += bn(c_in) + conv(c_in, width, 3) + bn(width) + conv(width, width, 3)
            if c_in != width:
                total += conv(c_in, width, 1)
            c_in = width
    return total + bn(c_in) + c_in * classes + classes


def test_list_backbones_are_in_timm_registry() -> None:
    assert list_backbones() == PROJECT
    assert set(PROJECT) <= set(timm.list_models())


def test_resnet20_parameter_count() -> None:
    option_a = n_params(resnet_cifar(20, shortcut="A"))
    option_b = n_params(timm.create_model("resnet20"))
    assert option_a == cifar_resnet_params(20, "A") == 269_722
    assert round(option_a / 1e6, 2) == 0.27  # the paper's Table 6
    # option B adds a 1x1 conv + BN at stages 2 and 3: 16*32 + 64 + 32*64 + 128 = 2,752
    assert option_b == cifar_resnet_params(20, "B") == 269_722 + 2_752
    # the paper's 0.46M and 0.85M for ResNet-32 and ResNet-56
    assert round(n_params(resnet_cifar(32, shortcut="A")) / 1e6, 2) == 0.46
    assert round(n_params(resnet_cifar(56, shortcut="A")) / 1e6, 2) == 0.85
    assert n_params(timm.create_model("resnet56")) == cifar_resnet_params(56, "B")


def test_wide_resnet_parameter_counts() -> None:
    for name, depth, k, paper in (("wrn16_4", 16, 4, 2.7), ("wrn28_10", 28, 10, 36.5)):
        model = timm.create_model(name, device="meta")
        assert n_params(model) == wrn_params(depth, k)
        assert round(n_params(model) / 1e6, 1) == paper
    assert n_params(timm.create_model("wrn10_2", in_chans=1, num_classes=7)) == wrn_params(
        10, 2, in_chans=1, classes=7
    )


@pytest.mark.parametrize("name", PROJECT)
@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("size", [8, 32])
def test_output_shapes(name: str, in_chans: int, size: int) -> None:
    device = "meta" if name in HEAVY else "cpu"
    model = timm.create_model(name, num_classes=7, in_chans=in_chans, device=device).eval()
    x = torch.randn(2, in_chans, size, size, device=device)
    width = NUM_FEATURES[name]
    reduction = 2 if name == "digits_cnn" else 4
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, width, size // reduction, size // reduction)
        assert model.forward_head(features, pre_logits=True).shape == (2, width)
        assert model.forward_head(features).shape == (2, 7)
        assert model(x).shape == (2, 7)
    assert model.num_features == width
    assert model.num_classes == 7
    assert isinstance(model.get_classifier(), nn.Linear)
    assert model.pretrained_cfg["architecture"] == name
    assert model.default_cfg is model.pretrained_cfg


@pytest.mark.parametrize("name", [n for n in PROJECT if n not in HEAVY])
def test_create_backbone_returns_pooled_features(name: str) -> None:
    backbone = create_backbone(name, in_chans=1)
    assert backbone.num_classes == 0
    assert isinstance(backbone.get_classifier(), nn.Identity)
    out = backbone(torch.randn(3, 1, 8, 8))
    assert out.shape == (3, backbone.num_features)


def test_timm_create_model_with_classes() -> None:
    model = timm.create_model("resnet20", num_classes=7)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert timm.create_model("digits_cnn")(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_reset_classifier() -> None:
    model = timm.create_model("digits_cnn", num_classes=10)
    model.reset_classifier(4)
    assert model.num_classes == 4 and model(torch.randn(2, 1, 8, 8)).shape == (2, 4)
    model.reset_classifier(0)
    assert model.num_classes == 0 and model(torch.randn(2, 1, 8, 8)).shape == (2, 128)


def test_features_only() -> None:
    extractor = timm.create_model("resnet20", features_only=True)
    maps = extractor(torch.randn(2, 3, 32, 32))
    assert [tuple(m.shape[1:]) for m in maps] == [
        (16, 32, 32),
        (16, 32, 32),
        (32, 16, 16),
        (64, 8, 8),
    ]


def test_unknown_kwargs_are_rejected() -> None:
    with pytest.raises(TypeError, match="depht"):
        timm.create_model("resnet20", depht=32)
    timm.create_model("resnet20", drop_path_rate=0.0)  # a switched-off generic option is fine


def test_option_a_shortcut_pads_with_zeros() -> None:
    x = torch.randn(2, 16, 8, 8)
    y = ZeroPadShortcut(16, 32, 2)(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert not y[:, :8].any() and not y[:, 24:].any()
    model = resnet_cifar(20, shortcut="A", num_classes=0)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 64)


def test_wrn10_2_one_block_per_stage_and_dropout_in_train_mode_only() -> None:
    model = create_backbone("wrn10_2", drop_rate=0.3)
    assert [len(stage) for stage in (model.layer1, model.layer2, model.layer3)] == [1, 1, 1]
    blocks = [m for m in model.modules() if isinstance(m, WideBasicBlock)]
    assert len(blocks) == 3
    assert all(b.drop.p == 0.3 for b in blocks)
    assert [b.conv2.out_channels for b in blocks] == [32, 64, 128]
    x = torch.randn(4, 3, 32, 32)
    model.train()
    torch.manual_seed(0)
    first = model(x)
    second = model(x)
    assert not torch.allclose(first, second)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    # without dropout, train-mode passes agree too
    plain = create_backbone("wrn10_2").train()
    assert torch.allclose(plain(x), plain(x))


def test_unknown_name_is_rejected_before_building(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> nn.Module:
        raise AssertionError("a model was built")

    monkeypatch.setattr(timm, "create_model", fail)
    with pytest.raises(ValueError) as info:
        create_backbone("resnet2O")
    text = str(info.value)
    assert "unknown backbone 'resnet2O'" in text
    assert "this project's backbones: " + ", ".join(PROJECT) in text
    assert "timm.list_models()" in text
    assert "did you mean 'resnet20'" in text


def test_timm_builtin_model_through_create_backbone() -> None:
    backbone = create_backbone("resnet18", in_chans=1)
    assert backbone.num_features == 512
    assert backbone(torch.randn(2, 1, 32, 32)).shape == (2, 512)


def test_pretrained_file_round_trip(tmp_path: Path) -> None:
    source = timm.create_model("resnet20", num_classes=10, in_chans=1).eval()
    with torch.no_grad():  # move the BN statistics away from their initial values
        for m in source.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "resnet20.pth"
    torch.save(source.state_dict(), path)  # includes fc.weight / fc.bias: ignored by the backbone

    backbone = create_backbone("resnet20", in_chans=1, pretrained_file=path).eval()
    fresh = create_backbone("resnet20", in_chans=1).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        expected = source.forward_head(source.forward_features(x), pre_logits=True)
        assert torch.equal(backbone(x), expected)
        assert not torch.allclose(fresh(x), expected)

    # a backbone's own state dict (wrapped as in a checkpoint) loads too
    torch.save({"state_dict": backbone.state_dict()}, tmp_path / "ckpt.pth")
    again = create_backbone("resnet20", in_chans=1, pretrained_file=tmp_path / "ckpt.pth").eval()
    with torch.no_grad():
        assert torch.equal(again(x), expected)

    # timm's own route for a local file gives the same model
    clone = timm.create_model(
        "resnet20", pretrained=True, pretrained_cfg_overlay={"file": str(path)}, in_chans=1
    ).eval()
    with torch.no_grad():
        assert torch.equal(clone(x), source(x))


def test_pretrained_file_with_wrong_keys(tmp_path: Path) -> None:
    state = create_backbone("digits_cnn", in_chans=1).state_dict()
    state["conv9.weight"] = state.pop("conv3.weight")
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    with pytest.raises(PretrainedFileError) as info:
        create_backbone("digits_cnn", in_chans=1, pretrained_file=path)
    text = str(info.value)
    assert "missing keys: conv3.weight" in text
    assert "unexpected keys: conv9.weight" in text
    assert info.value.missing == ["conv3.weight"]
    assert info.value.unexpected == ["conv9.weight"]

    # same keys, other input channels
    torch.save(create_backbone("digits_cnn", in_chans=3).state_dict(), path)
    with pytest.raises(PretrainedFileError, match=r"conv1\.weight \(file \[32, 3, 3, 3\]"):
        create_backbone("digits_cnn", in_chans=1, pretrained_file=path)

    with pytest.raises(FileNotFoundError):
        create_backbone("digits_cnn", pretrained_file=tmp_path / "absent.pth")


def test_package_exports() -> None:
    assert models.create_backbone is create_backbone
    assert models.list_backbones is list_backbones
