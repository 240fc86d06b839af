"""SMILE's mean teacher (Section 3.3): θ_T ← decay·θ_T + (1 − decay)·θ_S, frozen, in eval mode."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_stl.callbacks import MeanTeacherUpdate
from lightning_stl.methods import FineTune
from lightning_stl.models import create_backbone
from lightning_stl.models.mean_teacher import MeanTeacher
from tests.conftest import TargetBatches, bare_trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def moved_student(seed: int = 0) -> tuple[nn.Module, nn.Linear, MeanTeacher]:
    """A teacher copied from a student, then a student whose every tensor has moved."""
    torch.manual_seed(seed)
    backbone = create_backbone("digits_cnn", in_chans=1)
    classifier = nn.Linear(backbone.num_features, 5)
    teacher = MeanTeacher(backbone, classifier)
    with torch.no_grad():
        for module in (backbone, classifier):
            for value in module.state_dict(keep_vars=True).values():
                if value.is_floating_point():
                    value.add_(torch.rand_like(value) + 0.5)  # positive: running_var stays > 0
                else:
                    value.add_(7)
    return backbone, classifier, teacher


def flat_state(teacher: MeanTeacher) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in teacher.state_dict().items()}


def student_state(backbone: nn.Module, classifier: nn.Module | None) -> dict[str, torch.Tensor]:
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    if classifier is not None:
        state.update({f"classifier.{k}": v for k, v in classifier.state_dict().items()})
    return state


# ---------------------------------------------------------------------------- the update


@pytest.mark.parametrize("decay", [0.9, 0.999, 0.25])
def test_update_is_the_moving_average_of_each_tensor(decay):
    backbone, classifier, teacher = moved_student()
    old = flat_state(teacher)
    student = student_state(backbone, classifier)
    teacher.update(backbone, classifier, decay)
    new = teacher.state_dict()
    assert new.keys() == old.keys() == student.keys()
    for key in old:  # a plain loop over the tensors, in float64
        if old[key].is_floating_point():
            expected = decay * old[key].double() + (1 - decay) * student[key].double()
            torch.testing.assert_close(new[key].double(), expected, rtol=1e-6, atol=1e-6)
            assert not torch.equal(new[key], old[key]), key
        else:  # BatchNorm's num_batches_tracked: copied
            assert torch.equal(new[key], student[key]), key
            assert new[key].dtype == torch.int64


def known_student(step: int) -> tuple[nn.Module, nn.Linear]:
    """A tiny student (linear layer, BatchNorm, classifier) whose every tensor is a known function
    of ``step``: float tensors ``base + step * slope`` (``base`` = 0.5, 1, 1.5, ... along the
    tensor, ``slope`` = 1 + its index in the state dict), integer buffers ``10 * step + index``."""
    backbone = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    classifier = nn.Linear(3, 2)
    with torch.no_grad():
        for module in (backbone, classifier):
            for index, value in enumerate(module.state_dict(keep_vars=True).values()):
                if value.is_floating_point():
                    base = 0.5 * torch.arange(1, value.numel() + 1, dtype=torch.float64)
                    value.copy_((base + step * (1 + index)).reshape(value.shape))
                else:
                    value.fill_(10 * step + index)
    return backbone, classifier


@pytest.mark.parametrize("buffers", [True, False])
@pytest.mark.parametrize("include_classifier", [True, False])
def test_k_updates_give_the_closed_form_moving_average(include_classifier, buffers):
    """After k updates towards students θ_1..θ_k from θ_0: θ_T = d^k·θ_0 + (1 − d)·Σ_j d^(k−j)·θ_j
    for every averaged float tensor (computed here in float64), the last student's value for the
    integer buffers, and θ_0 for whatever is not averaged (the classifier, the buffers)."""
    decay, k = 0.75, 4
    students = [known_student(step) for step in range(k + 1)]
    states = [student_state(*student) for student in students]
    teacher = MeanTeacher(*students[0])
    for backbone, classifier in students[1:]:
        teacher.update(backbone, classifier, decay, include_classifier, buffers)
    parameters = {f"backbone.{n}" for n, _ in students[0][0].named_parameters()} | {
        f"classifier.{n}" for n, _ in students[0][1].named_parameters()
    }
    new = teacher.state_dict()
    assert new.keys() == states[0].keys()
    assert {name for name in new if name not in parameters} == {
        "backbone.1.running_mean",
        "backbone.1.running_var",
        "backbone.1.num_batches_tracked",
    }
    for key, value in new.items():
        averaged = (include_classifier or not key.startswith("classifier.")) and (
            buffers or key in parameters
        )
        if not averaged:
            expected = states[0][key]
        elif value.is_floating_point():
            expected = decay**k * states[0][key].double() + (1 - decay) * sum(
                decay ** (k - j) * states[j][key].double() for j in range(1, k + 1)
            )
        else:
            expected = states[k][key]
        torch.testing.assert_close(value.double(), expected.double(), rtol=1e-6, atol=1e-6)
        assert value.dtype == states[0][key].dtype, key


def test_decay_one_keeps_and_decay_zero_copies_exactly():
    backbone, classifier, teacher = moved_student()
    old = flat_state(teacher)
    teacher.update(backbone, classifier, 1.0)
    for key, value in teacher.state_dict().items():
        if value.is_floating_point():
            assert torch.equal(value, old[key]), key
    teacher.update(backbone, classifier, 0.0)
    for key, value in student_state(backbone, classifier).items():
        assert torch.equal(teacher.state_dict()[key], value), key


def test_two_updates_compose():
    backbone, classifier, teacher = moved_student()
    old = flat_state(teacher)["backbone.conv1.weight"].double()
    student = backbone.conv1.weight.detach().double()
    teacher.update(backbone, classifier, 0.5)
    teacher.update(backbone, classifier, 0.5)
    torch.testing.assert_close(
        teacher.backbone.conv1.weight.double(), 0.25 * old + 0.75 * student, rtol=1e-6, atol=1e-6
    )


def test_include_classifier_false_keeps_the_pretrained_classifier():
    backbone, classifier, teacher = moved_student()
    old = flat_state(teacher)
    teacher.update(backbone, classifier, 0.5, include_classifier=False)
    for key, value in teacher.state_dict().items():
        if key.startswith("classifier."):
            assert torch.equal(value, old[key]), key
        elif value.is_floating_point():
            assert not torch.equal(value, old[key]), key


def test_parameters_only_averages_the_parameters_and_keeps_every_buffer():
    """The official code's teacher (``for name, p in model_source.named_parameters()``): BatchNorm
    running statistics and counters stay those of the pre-trained model."""
    backbone, classifier, teacher = moved_student()
    old = flat_state(teacher)
    student = student_state(backbone, classifier)
    parameter_names = {f"backbone.{n}" for n, _ in backbone.named_parameters()} | {
        f"classifier.{n}" for n, _ in classifier.named_parameters()
    }
    buffer_names = set(old) - parameter_names
    assert {k for k in buffer_names if k.endswith("running_var")}, "the CNN has BatchNorm"
    teacher.update(backbone, classifier, 0.9, buffers=False)
    new = teacher.state_dict()
    for key in parameter_names:
        expected = 0.9 * old[key].double() + 0.1 * student[key].double()
        torch.testing.assert_close(new[key].double(), expected, rtol=1e-6, atol=1e-6)
    for key in buffer_names:
        assert torch.equal(new[key], old[key]), key
        assert not torch.equal(new[key], student[key]), key


def test_copy_from_makes_an_exact_copy():
    backbone, classifier, teacher = moved_student()
    teacher.copy_from(backbone, classifier)
    for key, value in student_state(backbone, classifier).items():
        assert torch.equal(teacher.state_dict()[key], value), key
    # a copy, not shared storage
    assert teacher.backbone.conv1.weight.data_ptr() != backbone.conv1.weight.data_ptr()


def test_a_student_of_another_shape_is_refused():
    _, classifier, teacher = moved_student()
    other = create_backbone("resnet20", in_chans=1)
    with pytest.raises(ValueError, match="no longer match"):
        teacher.update(other, classifier, 0.9)
    with pytest.raises(ValueError, match="gave none"):
        teacher.update(teacher.backbone, None, 0.9)


# ---------------------------------------------------------------------------- frozen, eval mode


def test_the_teacher_is_frozen_and_stays_in_eval_mode():
    backbone, classifier, teacher = moved_student()
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in backbone.parameters())
    teacher.train()
    assert not any(m.training for m in teacher.modules())
    teacher.train(True)
    assert not any(m.training for m in teacher.modules())
    # eval mode: BatchNorm uses and keeps its running statistics
    before = flat_state(teacher)
    x = torch.randn(6, 1, 8, 8, requires_grad=True)
    features, logits = teacher(x)
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert features.shape == (6, 128) and logits.shape == (6, 5)
    assert not features.requires_grad and not logits.requires_grad
    fmap, none = teacher(x, feature_map=True, classify=False)
    assert fmap.shape == (6, 128, 4, 4) and none is None
    torch.testing.assert_close(fmap.mean(dim=(2, 3)), features)


def smile_module(**kwargs) -> FineTune:
    options = {
        "num_target_classes": 4,
        "num_source_classes": 5,
        "mixup_alpha": 0.2,
        "feature_mixup_weight": 0.1,
        "label_mixup_weight": 0.1,
        "optimizer": {"lr": 0.05, "schedule": "step", "warmup_fraction": 0.0},
        **kwargs,
    }
    return FineTune(backbone="digits_cnn", in_chans=1, **options)


def test_finetune_train_mode_leaves_the_teacher_in_eval_mode():
    module = smile_module()
    module.train()
    assert module.backbone.training and module.head.training
    assert not any(m.training for m in module.teacher.modules())


def test_teacher_parameters_are_not_student_parameters():
    module = smile_module()
    student = {id(p) for p in module.student_parameters()}
    teacher = {id(p) for p in module.teacher.parameters()}
    assert teacher and not student & teacher
    trainable = {id(p) for n, p in module.named_parameters() if not n.startswith("teacher.")}
    assert student == trainable
    assert {k.split(".")[0] for k in module.state_dict()} >= {
        "backbone",
        "head",
        "source_head",
        "teacher",
    }
    assert "teacher.classifier.weight" in module.state_dict()


# ---------------------------------------------------------------------------- the callback


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"decay": -0.1}, r"decay=-0.1 is not allowed.*\[0, 1\]"),
        ({"decay": 1.5}, r"decay=1.5 is not allowed"),
        ({"decay": float("nan")}, r"decay=nan is not allowed"),
        ({"decay": True}, r"decay=True is not allowed"),
        ({"decay": "0.9"}, r"decay='0.9' is not allowed"),
        ({"every_n_steps": 0}, r"every_n_steps=0 is not allowed.*>= 1"),
        ({"every_n_steps": -3}, r"every_n_steps=-3 is not allowed"),
        ({"every_n_steps": 2.5}, r"every_n_steps=2.5 is not allowed"),
        ({"every_n_steps": True}, r"every_n_steps=True is not allowed"),
        ({"average_buffers": "no"}, r"average_buffers='no' is not allowed.*true or false"),
        ({"update_before_step": 1}, r"update_before_step=1 is not allowed"),
        ({"include_classifier": None}, r"include_classifier=None is not allowed"),
    ],
)
def test_bad_callback_settings_raise(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        MeanTeacherUpdate(**kwargs)


def test_the_hook_updates_when_global_step_is_a_multiple_of_the_period(monkeypatch):
    module = smile_module()
    seen = []
    monkeypatch.setattr(
        MeanTeacher,
        "update",
        lambda self, backbone, classifier, decay, include_classifier, buffers: seen.append(
            (fake.global_step, decay, include_classifier, buffers, backbone is module.backbone)
        ),
    )
    callback = MeanTeacherUpdate(
        decay=0.7, every_n_steps=4, include_classifier=False, average_buffers=False
    )
    fake = SimpleNamespace(global_step=0)
    for step in range(1, 14):
        callback.on_before_optimizer_step(fake, module, None)  # after-step mode: nothing here
        fake.global_step = step
        callback.on_train_batch_end(fake, module, None, None, step - 1)
    assert seen == [(s, 0.7, False, False, True) for s in (4, 8, 12)]


def test_the_callback_needs_a_teacher():
    with pytest.raises(ValueError, match=r"no mean teacher.*feature_mixup_weight > 0"):
        MeanTeacherUpdate().on_fit_start(None, FineTune(mixup_alpha=0.2))


def fit(
    module: FineTune,
    callback: MeanTeacherUpdate,
    max_steps: int,
    callbacks_extra: list[L.Callback] = (),
    **trainer_kwargs,
):
    trainer = bare_trainer([callback, *callbacks_extra], max_steps, **trainer_kwargs)
    trainer.fit(module, train_dataloaders=DataLoader(TargetBatches(), batch_size=8))
    return trainer


def spy_updates(monkeypatch, trainer_box: list) -> list[int]:
    steps: list[int] = []
    original = MeanTeacher.update

    def spy(self, *args, **kwargs):
        steps.append(trainer_box[0].global_step)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MeanTeacher, "update", spy)
    return steps


@pytest.mark.parametrize(("every", "expected"), [(1, [1, 2, 3, 4, 5, 6, 7]), (3, [3, 6])])
def test_a_fit_updates_the_teacher_every_n_optimiser_steps(monkeypatch, every, expected):
    torch.manual_seed(0)
    module = smile_module()
    box: list = []
    steps = spy_updates(monkeypatch, box)
    original_fit = L.Trainer.fit

    def remember(self, *args, **kwargs):
        box.append(self)
        return original_fit(self, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "fit", remember)
    start = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    trainer = fit(module, MeanTeacherUpdate(decay=0.5, every_n_steps=every), max_steps=7)
    assert trainer.global_step == 7
    assert steps == expected
    # the optimiser holds the student's parameters only
    in_optimizer = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in module.student_parameters()}
    assert not in_optimizer & {id(p) for p in module.teacher.parameters()}
    # the teacher moved, stayed frozen and in eval mode, and is not the student
    assert not torch.equal(module.teacher.backbone.conv1.weight, start["backbone.conv1.weight"])
    assert not torch.equal(module.teacher.backbone.conv1.weight, module.backbone.conv1.weight)
    assert not any(m.training for m in module.teacher.modules())
    assert all(p.grad is None for p in module.teacher.parameters())


class TeacherSnapshots(L.Callback):
    """Records, for every batch, the student's weights before its step and the teacher's weights
    its losses saw (the teacher's forward inside ``training_step``)."""

    def __init__(self, module: FineTune):
        self.student_before: list[torch.Tensor] = []
        self.teacher_seen: list[torch.Tensor] = []
        module.teacher.register_forward_pre_hook(
            lambda teacher, args: self.teacher_seen.append(
                teacher.backbone.conv1.weight.detach().clone()
            )
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.student_before.append(pl_module.backbone.conv1.weight.detach().clone())


def test_the_official_order_updates_inside_steps_0_n_2n_with_the_pre_step_student():
    """lixingjian/SMILE, ``FinetuneSMILE.loss``: the teacher's forward, then (at 0-based iterations
    0, n, 2n...) θ_T ← decay·θ_T + (1 − decay)·θ_S with the student before that step's update.
    Replayed here by hand from the recorded pre-step student weights."""
    torch.manual_seed(0)
    module = smile_module()
    snapshots = TeacherSnapshots(module)
    decay, every, steps = 0.5, 3, 8
    fit(
        module,
        MeanTeacherUpdate(decay=decay, every_n_steps=every, update_before_step=True),
        max_steps=steps,
        callbacks_extra=[snapshots],
    )
    teacher = snapshots.teacher_seen[0].double()  # the pre-trained teacher, seen by step 0
    for index in range(steps):
        torch.testing.assert_close(snapshots.teacher_seen[index].double(), teacher)
        if index % every == 0:  # after this step's forward, with the pre-step student
            teacher = decay * teacher + (1 - decay) * snapshots.student_before[index].double()
    torch.testing.assert_close(module.teacher.backbone.conv1.weight.double(), teacher)
    # the teacher moved at steps 3 and 6 (step 0's student is the teacher itself)
    assert not torch.equal(snapshots.teacher_seen[4], snapshots.teacher_seen[3])
    assert torch.equal(snapshots.teacher_seen[3], snapshots.teacher_seen[1])


def test_gradient_accumulation_updates_once_per_optimiser_step(monkeypatch):
    torch.manual_seed(0)
    module = smile_module()
    box: list = []
    steps = spy_updates(monkeypatch, box)
    original_fit = L.Trainer.fit

    def remember(self, *args, **kwargs):
        box.append(self)
        return original_fit(self, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "fit", remember)
    fit(
        module,
        MeanTeacherUpdate(decay=0.5, every_n_steps=2),
        max_steps=4,
        accumulate_grad_batches=2,
    )
    assert steps == [2, 4]


def test_the_teacher_survives_a_checkpoint_round_trip(tmp_path: Path):
    torch.manual_seed(0)
    module = smile_module()
    trainer = fit(module, MeanTeacherUpdate(decay=0.5), max_steps=3)
    path = tmp_path / "finetune.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    teacher_keys = [k for k in saved if k.startswith("teacher.")]
    assert len(teacher_keys) == len(module.teacher.state_dict())
    loaded = FineTune.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    for key, value in module.teacher.state_dict().items():
        assert torch.equal(loaded.teacher.state_dict()[key], value), key
    assert not torch.equal(loaded.teacher.backbone.conv1.weight, loaded.backbone.conv1.weight)
    assert not any(m.training for m in loaded.teacher.modules())
    assert all(not p.requires_grad for p in loaded.teacher.parameters())
    # a fresh module's teacher is overwritten by load_state_dict too
    fresh = smile_module()
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.teacher.classifier.weight, module.teacher.classifier.weight)
    assert math.isfinite(float(loaded.teacher.backbone.bn1.running_var.sum()))
