"""The pre-trained source model SMILE starts from (Section 3.1, ω_t^0 = ω_s), read from local files."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_stl.callbacks import MeanTeacherUpdate
from lightning_stl.methods import FineTune, SmoothTransfer
from lightning_stl.models import PretrainedFileError, create_backbone
from lightning_stl.models.source_model import SourceModel, read_source_model
from lightning_stl.pretraining import resolve_source_model
from lightning_stl.run import train
from lightning_stl.schedule import SOURCE, TARGET, ConstantTargetWeight, TargetWeightScheduler
from tests.conftest import bare_trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def save_classifier_model(path: Path, name: str, num_classes: int, in_chans: int) -> nn.Module:
    """``timm.create_model(name, num_classes)`` with its classifier, saved as a state dict."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=num_classes, in_chans=in_chans).eval()
    torch.save(model.state_dict(), path)
    return model


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(x), pre_logits=True)


def assert_source_is(source: SourceModel, model: nn.Module, classifier: str = "fc") -> None:
    state = model.state_dict()
    expected = {k: v for k, v in state.items() if not k.startswith(classifier + ".")}
    assert source.backbone.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(source.backbone[key], value), key
    assert torch.equal(source.classifier["weight"], state[f"{classifier}.weight"])
    assert torch.equal(source.classifier["bias"], state[f"{classifier}.bias"])


# ---------------------------------------------------------------------------- file formats


@pytest.mark.parametrize(
    ("name", "num_classes", "in_chans", "classifier", "image"),
    [
        ("resnet20", 7, 3, "fc", 16),  # this project's CIFAR ResNet
        ("digits_cnn", 10, 1, "fc", 8),
        ("test_resnet", 11, 3, "fc", 32),  # a (tiny) timm ResNet
        ("test_efficientnet", 6, 3, "classifier", 32),  # timm's other classifier name
        ("test_convnext", 5, 3, "head.fc", 64),  # a nested classifier
    ],
)
def test_a_timm_style_state_dict_gives_the_backbone_and_its_classifier(
    tmp_path, name, num_classes, in_chans, classifier, image
):
    path = tmp_path / f"{name}.pth"
    model = save_classifier_model(path, name, num_classes, in_chans)
    backbone = create_backbone(name, in_chans=in_chans)
    source = read_source_model(path, backbone)
    assert source.num_classes == num_classes
    assert str(path) in source.origin
    assert_source_is(source, model, classifier)
    backbone.load_state_dict(source.backbone, strict=True)
    backbone.eval()
    x = torch.randn(2, in_chans, image, image)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), pooled_features(model, x), rtol=0, atol=0)
        logits = backbone(x) @ source.classifier["weight"].T + source.classifier["bias"]
        torch.testing.assert_close(logits, model(x), rtol=1e-5, atol=1e-6)


def test_the_places365_checkpoint_format_gives_365_source_classes(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=365).eval()
    path = tmp_path / "resnet50_places365.pth.tar"
    torch.save(
        {
            "epoch": 90,
            "arch": "resnet50",
            "best_prec1": 54.74,
            "state_dict": {"module." + k: v for k, v in model.state_dict().items()},
        },
        path,
    )
    source = read_source_model(path, create_backbone("test_resnet", in_chans=3))
    assert source.num_classes == 365
    assert_source_is(source, model)


def test_a_safetensors_file_is_read(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    model = timm.create_model("digits_cnn", num_classes=4)
    path = tmp_path / "digits.safetensors"
    safetensors.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    source = read_source_model(path, create_backbone("digits_cnn", in_chans=1))
    assert_source_is(source, model)


class SourceBatches(Dataset):
    def __init__(self, domain: str, num_classes: int, n: int = 32):
        generator = torch.Generator().manual_seed(1)
        self.domain = domain
        self.x = torch.randn(n, 1, 8, 8, generator=generator)
        self.y = torch.randint(0, num_classes, (n,), generator=generator)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return {self.domain: (self.x[i], self.y[i])}


def fit_and_save(module, callbacks, domain, num_classes, path: Path) -> None:
    trainer = bare_trainer(callbacks, max_steps=3)
    loader = DataLoader(SourceBatches(domain, num_classes), batch_size=8)
    trainer.fit(module, train_dataloaders=loader)
    trainer.save_checkpoint(path)


def test_a_lightning_checkpoint_of_a_source_training(tmp_path):
    torch.manual_seed(0)
    module = SmoothTransfer(backbone="digits_cnn", num_target_classes=10, num_source_classes=13)
    path = tmp_path / "source.ckpt"
    fit_and_save(module, [TargetWeightScheduler(ConstantTargetWeight(0.0))], SOURCE, 13, path)
    source = read_source_model(path, create_backbone("digits_cnn", in_chans=1))
    assert source.num_classes == 13 and "checkpoint" in source.origin
    expected = module.model.backbone.state_dict()
    assert source.backbone.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(source.backbone[key], value), key
    assert torch.equal(source.classifier["weight"], module.model.source_head.weight)
    assert torch.equal(source.classifier["bias"], module.model.source_head.bias)


def test_a_lightning_checkpoint_of_a_finetuning_gives_the_student_not_the_teacher(tmp_path):
    torch.manual_seed(0)
    module = FineTune(
        num_target_classes=4,
        num_source_classes=6,
        mixup_alpha=0.2,
        feature_mixup_weight=0.1,
        label_mixup_weight=0.1,
        optimizer={"lr": 0.05},
    )
    path = tmp_path / "finetune.ckpt"
    fit_and_save(module, [MeanTeacherUpdate(decay=0.5)], TARGET, 4, path)
    assert not torch.equal(module.teacher.backbone.conv1.weight, module.backbone.conv1.weight)
    source = read_source_model(path, create_backbone("digits_cnn", in_chans=1))
    assert source.num_classes == 6
    for key, value in module.backbone.state_dict().items():
        assert torch.equal(source.backbone[key], value), key
    assert torch.equal(source.classifier["weight"], module.source_head.weight)
    assert torch.equal(source.classifier["bias"], module.source_head.bias)


def test_a_finetuning_checkpoint_without_auxiliary_head_has_no_classifier(tmp_path):
    module = FineTune(num_target_classes=4, mixup_alpha=0.2)
    path = tmp_path / "mixup.ckpt"
    torch.save({"state_dict": module.state_dict(), "global_step": 0}, path)
    source = read_source_model(path, create_backbone("digits_cnn", in_chans=1))
    assert source.classifier is None and source.num_classes is None


# ---------------------------------------------------------------------------- files that do not fit


def test_a_file_of_another_architecture_names_the_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / "resnet20.pth"
    save_classifier_model(path, "resnet20", 10, 1)
    with pytest.raises(PretrainedFileError) as info:
        read_source_model(path, create_backbone("digits_cnn", in_chans=1))
    error = info.value
    assert "conv3.weight" in error.missing and "bn3.running_mean" in error.missing
    assert any(k.startswith("layer1.") for k in error.unexpected)
    text = str(error)
    assert str(path) in text and "digits_cnn" in text
    assert "missing keys: " in text and "conv3.weight" in text
    assert "unexpected keys: " in text and error.unexpected[0] in text


def test_a_file_with_other_input_channels_says_so(tmp_path):
    path = tmp_path / "rgb_digits.pth"
    save_classifier_model(path, "digits_cnn", 10, 3)
    with pytest.raises(
        PretrainedFileError,
        match=r"conv1.weight \(file \[32, 3, 3, 3\] vs model \[32, 1, 3, 3\]\).*in_chans",
    ):
        read_source_model(path, create_backbone("digits_cnn", in_chans=1))


def test_a_classifier_of_the_wrong_width_is_refused(tmp_path):
    torch.manual_seed(0)
    state = dict(timm.create_model("digits_cnn", num_classes=10).state_dict())
    state["fc.weight"] = torch.zeros(10, 64)
    path = tmp_path / "bad_fc.pth"
    torch.save(state, path)
    with pytest.raises(PretrainedFileError, match=r"classifier.weight"):
        read_source_model(path, create_backbone("digits_cnn", in_chans=1))


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"backbone.weights='.*nowhere.pth' does not exist"):
        read_source_model(tmp_path / "nowhere.pth", create_backbone("digits_cnn", in_chans=1))


# ---------------------------------------------------------------------------- FineTune from a source


def digits_source(tmp_path: Path, num_classes: int | None = 10) -> tuple[Path, SourceModel]:
    path = tmp_path / "digits_source.pth"
    if num_classes is None:
        torch.manual_seed(0)
        torch.save(timm.create_model("digits_cnn", num_classes=0).state_dict(), path)
    else:
        save_classifier_model(path, "digits_cnn", num_classes, 1)
    return path, read_source_model(path, create_backbone("digits_cnn", in_chans=1))


def test_load_source_model_copies_backbone_and_auxiliary_head_and_the_teacher_follows(tmp_path):
    _, source = digits_source(tmp_path)
    torch.manual_seed(3)
    module = FineTune(
        num_target_classes=4,
        num_source_classes=10,
        mixup_alpha=0.2,
        feature_mixup_weight=0.1,
        label_mixup_weight=0.1,
    )
    head = {k: v.clone() for k, v in module.head.state_dict().items()}
    module.load_source_model(source)
    for key, value in source.backbone.items():
        assert torch.equal(module.backbone.state_dict()[key], value), key
    assert torch.equal(module.source_head.weight, source.classifier["weight"])
    assert torch.equal(module.source_head.bias, source.classifier["bias"])
    for key, value in module.head.state_dict().items():  # the target head stays new
        assert torch.equal(value, head[key]), key
    student = {f"backbone.{k}": v for k, v in module.backbone.state_dict().items()}
    student.update({f"classifier.{k}": v for k, v in module.source_head.state_dict().items()})
    teacher = module.teacher.state_dict()
    assert teacher.keys() == student.keys()
    for key, value in student.items():
        assert torch.equal(teacher[key], value), key
    # copies, not the source's tensors
    assert module.backbone.conv1.weight.data_ptr() != source.backbone["conv1.weight"].data_ptr()


def test_a_classifier_free_source_with_label_mixup_raises(tmp_path):
    _, source = digits_source(tmp_path, num_classes=None)
    assert source.classifier is None
    module = FineTune(num_source_classes=10, mixup_alpha=0.2, label_mixup_weight=0.1)
    with pytest.raises(
        ValueError,
        match=r"label_mixup_weight \(γ_FC\)=0.1 \(or Co-Tuning\) needs a source classifier",
    ):
        module.load_source_model(source)
    # without L_FC the same source is fine
    plain = FineTune(mixup_alpha=0.2, feature_mixup_weight=0.1)
    plain.load_source_model(source)
    assert torch.equal(plain.teacher.backbone.conv1.weight, source.backbone["conv1.weight"])


def test_a_source_classifier_of_another_size_raises(tmp_path):
    _, source = digits_source(tmp_path, num_classes=7)
    module = FineTune(num_source_classes=10, mixup_alpha=0.2, label_mixup_weight=0.1)
    with pytest.raises(ValueError, match=r"shape \[7, 128\].*\[10, 128\]"):
        module.load_source_model(source)


# ---------------------------------------------------------------------------- no network


@pytest.fixture
def offline(monkeypatch) -> list[dict]:
    """Any TCP connection fails, and asking timm for pre-trained weights fails (and is recorded)."""

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    real = timm.create_model
    calls: list[dict] = []

    def guarded(model_name, pretrained=False, *args, **kwargs):
        calls.append({"name": model_name, "pretrained": pretrained})
        if pretrained:
            raise AssertionError("timm pre-trained weights requested")
        return real(model_name, pretrained, *args, **kwargs)

    monkeypatch.setattr(timm, "create_model", guarded)
    return calls


def test_a_given_file_wins_over_timm_weights_without_touching_the_network(
    make_cfg, tmp_path, offline, monkeypatch
):
    path, _ = digits_source(tmp_path)
    cfg = make_cfg("method=smile", f"backbone.weights={path}", "backbone.pretrained=true")
    source = resolve_source_model(cfg, None)
    assert source.num_classes == 10 and str(path) in source.origin
    started: list[dict[str, torch.Tensor]] = []
    original = FineTune.load_source_model

    def remember(self, source):
        original(self, source)
        state = {f"backbone.{k}": v for k, v in self.backbone.state_dict().items()}
        state.update({f"source_head.{k}": v for k, v in self.source_head.state_dict().items()})
        started.append({k: v.detach().clone() for k, v in state.items()})

    monkeypatch.setattr(FineTune, "load_source_model", remember)
    metrics = train(cfg)
    assert metrics["total_steps"] == 2  # the run trained, offline
    # it started from the file as saved: its backbone, and its classifier as the auxiliary head
    saved = torch.load(path, map_location="cpu", weights_only=True)
    expected = {
        (f"source_head.{k[3:]}" if k.startswith("fc.") else f"backbone.{k}"): v
        for k, v in saved.items()
    }
    (start,) = started
    assert start.keys() == expected.keys()
    assert [k for k in expected if not torch.equal(start[k], expected[k])] == []
    assert offline and not any(call["pretrained"] for call in offline)


def test_timm_weights_offline_fail_with_the_way_to_give_a_file(make_cfg, offline):
    cfg = make_cfg("method=smile", "backbone.pretrained=true")
    with pytest.raises(RuntimeError, match=r"backbone.name='digits_cnn'.*backbone.weights="):
        resolve_source_model(cfg, None)
    assert any(call["pretrained"] for call in offline)
