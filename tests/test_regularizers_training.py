"""RIFLE, Co-Tuning and RegSL: schedules, relationships, penalties, projections, self-labelling."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import hydra
import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from lightning_stl.callbacks.regsl_projection import (
    RegSLProjection,
    project_,
    projection_radii,
)
from lightning_stl.callbacks.rifle import RIFLE, rifle_steps
from lightning_stl.method_module import resolve_regularizers
from lightning_stl.methods import FineTune
from lightning_stl.models import create_backbone
from lightning_stl.models.source_model import SourceModel
from lightning_stl.regularizers.base import FineTuneStep
from lightning_stl.regularizers.cotuning import (
    CoTuning,
    direct_relationship,
    reverse_relationship,
)
from lightning_stl.regularizers.mixup import MixupPairs
from lightning_stl.regularizers.regsl import (
    RegSL,
    correct_labels,
    loss_weights,
    reweight_temperature,
)
from lightning_stl.run import compose_config
from lightning_stl.schedule import TARGET
from tests.conftest import TargetBatches, bare_trainer

K_T, K_S, FEATURES = 4, 6, 128


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def finetune(**kwargs) -> FineTune:
    options = {
        "num_target_classes": K_T,
        "optimizer": {"lr": 0.05, "schedule": "step", "warmup_fraction": 0.0},
        **kwargs,
    }
    return FineTune(backbone="digits_cnn", in_chans=1, **options)


def trainer(callbacks: list[Callback], max_steps: int, **kwargs) -> L.Trainer:
    return bare_trainer(callbacks, max_steps, **kwargs)


def loader() -> DataLoader:
    return DataLoader(TargetBatches(num_classes=K_T), batch_size=8)


# ============================================================================ RIFLE


def test_rifle_steps_are_evenly_spaced_periods():
    assert rifle_steps(40, 3) == [10, 20, 30]  # the paper: re-inits after epochs 10, 20, 30 of 40
    assert rifle_steps(100, 3, 0.125) == [25, 50, 75]
    assert rifle_steps(9000, 1) == [4500]
    assert rifle_steps(100, 0) == []
    # 9 re-inits in 10 steps: the one after step 9 would leave less than the last ⌈1.25⌉ = 2 steps
    assert rifle_steps(10, 9, 0.125) == list(range(1, 9))
    assert rifle_steps(2, 3, 0.0) == [1]  # duplicates merged, never after step 0


@pytest.mark.parametrize("total", [1, 2, 7, 40, 99, 1000])
@pytest.mark.parametrize("times", [0, 1, 3, 5, 20])
@pytest.mark.parametrize("last_fraction", [0.0, 0.1, 0.125, 0.5, 0.9])
def test_rifle_never_reinitialises_in_the_last_stretch(total, times, last_fraction):
    steps = rifle_steps(total, times, last_fraction)
    last_stretch = math.ceil(last_fraction * total)
    assert steps == sorted(set(steps)) and len(steps) <= times
    assert all(s >= 1 and total - s >= last_stretch for s in steps)
    # what is kept is exactly the paper's schedule k·T/(times+1) outside the last stretch
    periodic = {k * total // (times + 1) for k in range(1, times + 1)}
    assert set(steps) == {s for s in periodic if s >= 1 and total - s >= last_stretch}


class HeadSpy(Callback):
    """Records, per batch, the global step and whether the head changed since the last batch
    ended (only a re-initialisation changes it between batches), and the head's optimiser state."""

    def __init__(self):
        self.changed_at: list[int] = []
        self.state_cleared: list[bool] = []
        self._last = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        weight = pl_module.head.weight.detach()
        if self._last is not None and not torch.equal(weight, self._last):
            self.changed_at.append(trainer.global_step)
            state = trainer.optimizers[0].state
            self.state_cleared.append(pl_module.head.weight not in state)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._last = pl_module.head.weight.detach().clone()


def spy_resets(monkeypatch) -> list[int]:
    """Global steps at which any RIFLE re-initialised (patched ``RIFLE.reinitialise``)."""
    steps: list[int] = []
    original = RIFLE.reinitialise

    def spy(self, trainer, pl_module):
        steps.append(trainer.global_step)
        return original(self, trainer, pl_module)

    monkeypatch.setattr(RIFLE, "reinitialise", spy)
    return steps


def test_rifle_reinitialises_the_head_exactly_at_the_scheduled_steps(monkeypatch):
    torch.manual_seed(0)
    module = finetune()
    resets = spy_resets(monkeypatch)
    rifle, spy = RIFLE(times=3, last_fraction=0.125), HeadSpy()
    backbone_id = id(module.backbone.conv1.weight)
    trainer([rifle, spy], max_steps=8).fit(module, train_dataloaders=loader())
    assert rifle.schedule == rifle_steps(8, 3, 0.125) == [2, 4, 6]
    assert resets == [2, 4, 6]
    assert spy.changed_at == [2, 4, 6]  # the head's weights jump exactly there, nowhere else
    assert spy.state_cleared == [True, True, True]  # with its momentum forgotten
    assert rifle.state_dict() == {"schedule": [2, 4, 6], "done": [2, 4, 6]}
    assert id(module.backbone.conv1.weight) == backbone_id


def test_rifle_acts_once_per_optimiser_step_under_gradient_accumulation(monkeypatch):
    torch.manual_seed(0)
    resets = spy_resets(monkeypatch)
    spy = HeadSpy()
    trainer([RIFLE(times=2, last_fraction=0.0), spy], max_steps=6, accumulate_grad_batches=2).fit(
        finetune(), train_dataloaders=loader()
    )
    assert resets == [2, 4]
    assert spy.changed_at == [2, 4]


class StopAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


@pytest.mark.parametrize("stop_at", [2, 3])
def test_a_resumed_run_neither_repeats_nor_skips_a_reinitialisation(
    monkeypatch, tmp_path: Path, stop_at: int
):
    torch.manual_seed(0)
    resets = spy_resets(monkeypatch)
    first = trainer([RIFLE(times=3), StopAt(stop_at)], max_steps=8)
    first.fit(finetune(), train_dataloaders=loader())
    assert first.global_step == stop_at
    path = tmp_path / "stopped.ckpt"
    first.save_checkpoint(path)
    before = list(resets)
    # stopped right after step 2, the re-init due after it was not done yet: the checkpoint says
    # so, and the resumed run does it first
    assert before == ([] if stop_at == 2 else [2])
    rifle = RIFLE(times=3)
    trainer([rifle], max_steps=8).fit(finetune(), train_dataloaders=loader(), ckpt_path=path)
    assert before + resets[len(before) :] == [2, 4, 6]
    assert resets[len(before) :] == ([2, 4, 6] if stop_at == 2 else [4, 6])
    assert rifle.done == [2, 4, 6]


# ============================================================================ Co-Tuning


class StubDataModule:
    """What CoTuning.setup reads of a SourceTargetDataModule: the target training set, an
    evaluation loader over it and the on-device preprocessing (here: none)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.train_sets = {TARGET: TensorDataset(x, y)}

    def target_loader(self, split):
        return DataLoader(self.train_sets[TARGET], batch_size=7, shuffle=False)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        return x, y


def cotuning_setup(method: str = "direct", n: int = 40, **kwargs):
    """A FineTune with Co-Tuning, loaded with a source model whose classifier has K_S classes
    (as lightning_stl.method_module.build_module does), and a stub of the target training data."""
    torch.manual_seed(0)
    module = finetune(num_source_classes=K_S, regularizers=[CoTuning(method=method, **kwargs)])
    backbone = create_backbone("digits_cnn", in_chans=1)
    classifier = {"weight": torch.randn(K_S, FEATURES), "bias": torch.randn(K_S)}
    module.load_source_model(SourceModel(backbone.state_dict(), classifier, "test"))
    x = torch.randn(n, 1, 8, 8)
    y = torch.arange(n) % K_T
    return module, StubDataModule(x, y), x, y


def test_cotuning_fine_tunes_the_source_head_loaded_from_the_pretrained_classifier():
    module, *_ = cotuning_setup()
    assert module.source_head is not None and module.teacher is None
    # the pre-trained classifier, trained by the optimiser and saved in checkpoints
    assert torch.equal(module.source_head.weight, module.source_model.classifier["weight"])
    assert {id(p) for p in module.source_head.parameters()} <= {
        id(p) for p in module.student_parameters()
    }
    assert "source_head.weight" in module.state_dict()
    # the decision is an hparam: the model rebuilt from its checkpoint has the head too
    assert module.hparams["with_source_head"] is True
    FineTune(**module.hparams).load_state_dict(module.state_dict())
    with pytest.raises(ValueError, match="with_source_head=False is not allowed"):
        finetune(
            num_source_classes=K_S, mixup_alpha=0.2, label_mixup_weight=0.1, with_source_head=False
        )


def test_a_cotuning_checkpoint_of_the_old_form_is_read_back(tmp_path):
    """Before regularisers were objects, hparams held their configs and no with_source_head."""
    import lightning

    from lightning_stl.finished_run import load_module

    module, *_ = cotuning_setup()
    hparams = {k: v for k, v in module.hparams.items() if k != "with_source_head"}
    hparams["regularizers"] = [{"_target_": "lightning_stl.regularizers.cotuning.CoTuning"}]
    path = tmp_path / "old.ckpt"
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": hparams,
            "pytorch-lightning_version": lightning.__version__,
        },
        path,
    )
    run = SimpleNamespace(
        checkpoint=path,
        identity={"method": {"module": {"_target_": "lightning_stl.methods.finetune.FineTune"}}},
    )
    loaded = load_module(run)
    assert loaded.source_head is not None and len(loaded.regularizers) == 0
    for key, value in module.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


def test_direct_relationship_is_the_per_class_mean_of_source_probabilities():
    module, datamodule, x, y = cotuning_setup("direct")
    keys = set(module.state_dict())
    module.setup_regularizers(datamodule)
    cotuning = module.regularizers[0]
    assert set(module.state_dict()) == keys  # setup adds no checkpoint keys
    # by hand: the pre-trained classifier on the pre-trained features, in eval mode
    module.eval()
    with torch.no_grad():
        classifier = module.source_model.classifier
        probs = (module.backbone(x) @ classifier["weight"].T + classifier["bias"]).softmax(dim=1)
    module.train()
    expected = torch.stack([probs[y == c].mean(dim=0) for c in range(K_T)])
    assert cotuning.relationship.shape == (K_T, K_S)
    torch.testing.assert_close(cotuning.relationship, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cotuning.relationship.sum(dim=1), torch.ones(K_T))
    assert module.training and module.backbone.training  # back in train mode


def test_direct_relationship_function_by_hand():
    probabilities = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1])
    relationship = direct_relationship(probabilities, labels, 2)
    torch.testing.assert_close(
        relationship, torch.tensor([[0.6, 0.4], [0.1, 0.9]], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match=r"target classes \[2\] have none"):
        direct_relationship(probabilities, labels, 3)


def correlated_probabilities(n: int = 120, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Source probabilities ``[n, K_S]`` whose source class c is likely for target class c."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % K_T
    logits = torch.randn(n, K_S, generator=generator)
    logits[torch.arange(n), labels] += 3.0
    return logits.softmax(dim=1).double(), labels


@pytest.mark.parametrize("holdout_fraction", [0.2, 0.0])
def test_reverse_relationship_rows_are_distributions(holdout_fraction):
    probabilities, labels = correlated_probabilities()
    relationship = reverse_relationship(
        probabilities, labels, K_T, c_grid=(100.0, 1.0, 0.01), holdout_fraction=holdout_fraction
    )
    assert relationship.shape == (K_T, K_S)
    assert (relationship >= 0).all()
    torch.testing.assert_close(relationship.sum(dim=1), torch.ones(K_T, dtype=torch.float64))
    # target class c is translated mostly into source class c
    assert relationship.argmax(dim=1).tolist() == list(range(K_T))


def test_reverse_relationship_of_two_target_classes():
    probabilities, labels = correlated_probabilities()
    labels = labels % 2
    relationship = reverse_relationship(probabilities, labels, 2, c_grid=(1.0,))
    assert relationship.shape == (2, K_S)
    torch.testing.assert_close(relationship.sum(dim=1), torch.ones(2, dtype=torch.float64))


def test_reverse_setup_gives_distributions():
    module, datamodule, *_ = cotuning_setup("reverse", n=40, c_grid=[1.0, 0.1])
    module.setup_regularizers(datamodule)
    relationship = module.regularizers[0].relationship
    assert relationship.shape == (K_T, K_S) and relationship.dtype == torch.float32
    torch.testing.assert_close(relationship.sum(dim=1), torch.ones(K_T))


def test_cotuning_penalty_is_the_cross_entropy_against_the_relationship():
    module, datamodule, x, y = cotuning_setup("direct", trade_off=2.3)
    module.setup_regularizers(datamodule)
    cotuning = module.regularizers[0]
    features = torch.randn(5, FEATURES)
    labels = torch.tensor([0, 3, 1, 1, 2])
    step = FineTuneStep(x[:5], x[:5], labels, None, features, torch.randn(5, K_T), None)
    penalty = cotuning(step)
    weight, bias = module.source_head.weight, module.source_head.bias
    manual = 0.0
    for i in range(5):
        log_probs = torch.log_softmax(weight @ features[i] + bias, dim=0)
        manual -= sum(cotuning.relationship[labels[i], s] * log_probs[s] for s in range(K_S))
    torch.testing.assert_close(penalty, 2.3 * manual / 5)
    penalty.backward()  # the source classifier learns from it
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    # under mixup the soft labels are mixed like the inputs
    pairs = MixupPairs(0.3, torch.tensor([4, 3, 2, 1, 0]))
    mixed = FineTuneStep(x[:5], x[:5], labels, None, features, torch.randn(5, K_T), pairs)
    soft = pairs.mix(cotuning.relationship[labels])
    expected = -(soft * torch.log_softmax(features @ weight.T + bias, dim=1)).sum(dim=1).mean()
    torch.testing.assert_close(cotuning(mixed), 2.3 * expected)


def test_cotuning_needs_a_setup_and_a_source_classifier():
    module, datamodule, x, y = cotuning_setup("direct")
    step = FineTuneStep(x[:2], x[:2], y[:2], None, torch.randn(2, FEATURES), None, None)
    with pytest.raises(RuntimeError, match="CoTuning is not set up: call setup"):
        module.regularizers[0](step)
    module.source_head = None
    with pytest.raises(
        ValueError, match="fine-tunes the pre-trained source classifier.*num_source_classes"
    ):
        module.setup_regularizers(datamodule)
    # FineTune refuses Co-Tuning without a source classifier to copy
    with pytest.raises(ValueError, match="Co-Tuning"):
        finetune(num_source_classes=None, regularizers=[CoTuning()])


# ============================================================================ RegSL projection


def moved_backbone(seed: int = 0):
    torch.manual_seed(seed)
    module = finetune()
    callback = RegSLProjection(radius=0.5, growth=2.0, head_radius=1.0)
    callback.setup(None, module, "fit")
    return module, callback


def test_projection_radii_grow_with_depth():
    backbone = create_backbone("digits_cnn", in_chans=1)
    radii = projection_radii(backbone, 0.5, 2.0)
    assert radii == {"conv1.weight": 0.5, "conv2.weight": 1.0, "conv3.weight": 2.0}
    resnet = create_backbone("resnet20", in_chans=1)
    official = projection_radii(resnet, 1.0, 3.0, {"layer1": 0, "layer2": 0, "layer3": 1})
    assert "conv1.weight" not in official  # the stem is free, as in the official code
    assert {official[n] for n in official if n.startswith("layer3.")} == {3.0}
    assert {official[n] for n in official if n.startswith("layer1.")} == {1.0}
    with pytest.raises(ValueError, match=r"prefix 'layer4' names no weight.*layer1, layer2"):
        projection_radii(resnet, 1.0, 2.0, {"layer4": 2})


def test_projection_puts_every_layer_in_its_ball_and_leaves_inside_ones_untouched():
    module, callback = moved_backbone()
    parameters = dict(module.backbone.named_parameters())
    with torch.no_grad():
        parameters["conv1.weight"].add_(torch.randn_like(parameters["conv1.weight"]))  # far out
        parameters["conv3.weight"].add_(torch.randn_like(parameters["conv3.weight"]))
        small = torch.randn_like(parameters["conv2.weight"])
        parameters["conv2.weight"].add_(0.5 * small / small.norm())  # inside its radius 1.0
        module.head.weight.mul_(100.0)
    inside = parameters["conv2.weight"].detach().clone()
    outside = parameters["conv1.weight"].detach() - callback.references["conv1.weight"]
    bn = module.backbone.bn1.weight.detach().clone()
    callback.project(module)
    for name, radius in callback.radii.items():
        distance = (parameters[name] - callback.references[name]).norm()
        assert distance <= radius * (1 + 1e-5), name
    assert torch.equal(parameters["conv2.weight"], inside)  # bit for bit
    moved = parameters["conv1.weight"].detach() - callback.references["conv1.weight"]
    torch.testing.assert_close(moved.norm(), torch.tensor(0.5))  # on the sphere...
    torch.testing.assert_close(moved / moved.norm(), outside / outside.norm())  # ...same direction
    assert module.head.weight.norm() <= 1.0 * (1 + 1e-5)
    assert torch.equal(module.backbone.bn1.weight, bn)  # BatchNorm is free


def test_project_in_place_function():
    reference = torch.zeros(3, 4)
    weight = torch.full((3, 4), 1.0)  # distance sqrt(12)
    project_(weight, reference, 2.0)
    torch.testing.assert_close(weight, torch.full((3, 4), 2.0 / math.sqrt(12)))


def test_projection_during_a_fit_keeps_the_weights_in_their_balls():
    torch.manual_seed(0)
    module = finetune(optimizer={"lr": 0.5, "schedule": "step", "warmup_fraction": 0.0})
    start = {n: p.detach().clone() for n, p in module.backbone.named_parameters()}
    callback = RegSLProjection(radius=0.01, growth=2.0, head_radius=0.1)
    trainer([callback], max_steps=4, accumulate_grad_batches=2).fit(
        module, train_dataloaders=loader()
    )
    parameters = dict(module.backbone.named_parameters())
    for name, radius in callback.radii.items():
        assert torch.equal(callback.references[name], start[name])  # the pre-trained weights
        distance = (parameters[name] - start[name]).norm()
        assert 0 < distance <= radius * (1 + 1e-5), name
    assert module.head.weight.norm() <= 0.1 * (1 + 1e-5)


# ============================================================================ RegSL self-labelling


def test_self_labelling_flips_exactly_the_confidently_contradicted_labels():
    def logits_of(probability: float, k: int) -> torch.Tensor:  # p(k) = probability of 3 classes
        rest = (1 - probability) / 2
        row = torch.full((3,), math.log(rest))
        row[k] = math.log(probability)
        return row

    logits = torch.stack(
        [
            logits_of(0.95, 0),  # confident, agrees with its label 0: kept
            logits_of(0.95, 2),  # confident, contradicts label 1: flipped to 2
            logits_of(0.85, 2),  # contradicts label 0 but not confident enough: kept
            logits_of(0.99, 1),  # confident, contradicts label 0: flipped to 1
            logits_of(0.40, 1),  # unsure: kept
        ]
    )
    labels = torch.tensor([0, 1, 0, 0, 2])
    new, changed = correct_labels(logits, labels, 0.9)
    assert new.tolist() == [0, 2, 0, 1, 2]
    assert changed.tolist() == [False, True, False, True, False]
    assert labels.tolist() == [0, 1, 0, 0, 2]  # the input is not modified


def test_reweighting_averages_one_and_orders_inversely_with_the_loss():
    losses = torch.tensor([0.3, 2.0, 0.01, 5.0, 1.1, 0.7], requires_grad=True)
    for temperature in (0.5, 2.0, 10.0):
        weights = loss_weights(losses, temperature)
        torch.testing.assert_close(weights.mean(), torch.tensor(1.0))
        assert not weights.requires_grad
        assert torch.argsort(weights).tolist() == torch.argsort(losses, descending=True).tolist()
    equal = loss_weights(torch.full((4,), 1.3), 1.0)
    torch.testing.assert_close(equal, torch.ones(4))


def test_reweighting_temperature_decays_to_half():
    """1-based epochs; the official code lowers τ at the end of each epoch after the 5th."""
    assert reweight_temperature(3, 5, 2.0) == 2.0
    assert reweight_temperature(5, 5, 2.0) == 2.0
    assert reweight_temperature(6, 5, 2.0) == 2.0
    assert reweight_temperature(7, 5, 2.0) == pytest.approx(2.0 * math.exp(-0.1))
    assert reweight_temperature(100, 5, 2.0) == 1.0


def official_regsl_epochs(epochs: int, adaptive_epoch: int, correct_epoch: int, temp: float):
    """The bookkeeping of the official ``ConstraintTrainer`` replayed line by line
    (VirtuosoResearch/Regularized-Self-Labeling: ``base_trainer.py`` ``start_epoch = 1`` and
    ``for epoch in range(self.start_epoch, self.epochs + 1)``; ``constraint_trainer.py``
    ``_train_adaptive_epoch``): for each epoch, (labels corrected?, losses re-weighted?, τ)."""
    init_temp, rows = temp, []
    for epoch in range(1, epochs + 1):
        corrects = epoch >= correct_epoch
        reweights = not epoch < adaptive_epoch
        rows.append((corrects, reweights, temp))
        if epoch > adaptive_epoch:  # "Schedule the temperature", at the end of the epoch
            temp = max(0.5, math.exp(-0.1 * (epoch - adaptive_epoch))) * init_temp
    return rows


def test_regsl_schedules_start_in_the_epochs_the_official_trainer_starts_them():
    """Re-weighting from the 5th epoch, correction from the 10th (1-based, as the official code);
    Lightning's ``current_epoch`` is 0-based. Each epoch's loss is recomputed in numpy."""
    regsl = RegSL(threshold=0.6, correct_epoch=10, reweight_epoch=5, temperature=2.0)
    torch.manual_seed(1)
    logits = torch.randn(8, K_T, dtype=torch.float64) * 3
    labels = torch.randint(0, K_T, (8,))
    x = torch.zeros(8, 1, 8, 8)
    step = FineTuneStep(x, x, labels, None, torch.zeros(8, FEATURES), logits, None)
    z = logits.numpy()
    log_p = z - z.max(1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(1, keepdims=True))
    p = np.exp(log_p)
    flipped = (p.max(1) > 0.6) & (p.argmax(1) != labels.numpy())
    assert flipped.any()
    schedule = official_regsl_epochs(14, adaptive_epoch=5, correct_epoch=10, temp=2.0)
    assert [r[:2] for r in schedule].index((False, True)) == 4  # current_epoch 4 = 5th epoch
    assert [r[0] for r in schedule].index(True) == 9
    seen_temperatures = set()
    for current_epoch, (corrects, reweights, temp) in enumerate(schedule):
        target = np.where(flipped, p.argmax(1), labels.numpy()) if corrects else labels.numpy()
        losses = -log_p[np.arange(8), target]
        if reweights:
            e = np.exp(-losses / temp)
            weights = 8 * e / e.sum()
            seen_temperatures.add(round(temp, 12))
        else:
            weights = np.ones(8)
        expected = float(np.mean(weights * losses))
        ce = F.cross_entropy(logits, labels)
        got = ce + regsl(replace(step, epoch=current_epoch))
        assert got.item() == pytest.approx(expected, rel=1e-10), current_epoch
    assert len(seen_temperatures) >= 5  # τ decays over the replayed epochs


def test_regsl_turns_fine_tunes_cross_entropy_into_the_self_labelled_loss():
    regsl = RegSL(threshold=0.6, correct_epoch=3, reweight_epoch=2, temperature=1.0)
    torch.manual_seed(0)
    logits = torch.randn(8, K_T) * 3
    labels = torch.randint(0, K_T, (8,))
    x = torch.zeros(8, 1, 8, 8)
    step = FineTuneStep(x, x, labels, None, torch.zeros(8, FEATURES), logits, None)
    ce = F.cross_entropy(logits, labels)
    # the first epoch (current_epoch 0): plain cross-entropy, no correction
    torch.testing.assert_close(regsl(replace(step, epoch=0)), torch.tensor(0.0))
    # the 4th epoch (current_epoch 3): corrected labels, re-weighted losses, in numpy
    z = logits.double().numpy()
    log_p = z - z.max(1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(1, keepdims=True))
    p = np.exp(log_p)
    flipped = (p.max(1) > 0.6) & (p.argmax(1) != labels.numpy())
    assert flipped.any()
    corrected = np.where(flipped, p.argmax(1), labels.numpy())
    losses = -log_p[np.arange(8), corrected]
    temperature = 1.0 * max(0.5, math.exp(-0.1 * (4 - 1 - 2)))  # lowered once, after epoch 3
    weights = 8 * np.exp(-losses / temperature) / np.exp(-losses / temperature).sum()
    total = ce + regsl(replace(step, epoch=3))
    assert total.item() == pytest.approx(float(np.mean(weights * losses)), rel=1e-5)
    with pytest.raises(ValueError, match="mixup_alpha=null"):
        pairs = MixupPairs(0.5, torch.arange(8))
        regsl(FineTuneStep(x, x, labels, None, x, logits, pairs))


# ============================================================================ bad settings


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda: CoTuning(trade_off=-1.0), r"trade_off=-1.0 is not allowed.*>= 0"),
        (lambda: CoTuning(method="forward"), r"method='forward' is not allowed.*reverse, direct"),
        (lambda: CoTuning(holdout_fraction=1.0), r"holdout_fraction=1.0 is not allowed"),
        (lambda: CoTuning(c_grid=[1.0, 0.0]), r"c_grid=\[1.0, 0.0\] is not allowed"),
        (lambda: RIFLE(times=-1), r"times=-1 is not allowed.*integer >= 0"),
        (lambda: RIFLE(times=2.5), r"times=2.5 is not allowed"),
        (lambda: RIFLE(last_fraction=1.0), r"last_fraction=1.0 is not allowed.*\[0, 1\)"),
        (lambda: rifle_steps(0, 3), r"total_steps=0 is not allowed"),
        (lambda: RegSLProjection(radius=0.0), r"radius=0.0 is not allowed.*> 0"),
        (lambda: RegSLProjection(radius=-2), r"radius=-2 is not allowed"),
        (lambda: RegSLProjection(head_radius=0), r"head_radius=0 is not allowed"),
        (lambda: RegSLProjection(growth=0), r"growth=0 is not allowed"),
        (lambda: RegSL(threshold=0.0), r"threshold=0.0 is not allowed.*\(0, 1\)"),
        (lambda: RegSL(threshold=1.0), r"threshold=1.0 is not allowed"),
        (lambda: RegSL(threshold=1.5), r"threshold=1.5 is not allowed"),
        (lambda: RegSL(temperature=0), r"temperature=0 is not allowed"),
        (lambda: RegSL(correct_epoch=-1), r"correct_epoch=-1 is not allowed"),
        (lambda: RegSL(reweight_epoch=0), r"reweight_epoch=0 is not allowed.*>= 1.*counted from 1"),
    ],
)
def test_bad_settings_raise_naming_the_value(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()


# ============================================================================ configs


@pytest.mark.parametrize(
    ("method", "regularizer", "callback"),
    [
        ("rifle", None, RIFLE),
        ("cotuning", CoTuning, None),
        ("regsl", RegSL, RegSLProjection),
    ],
)
def test_method_configs_build_their_parts(tmp_path: Path, method, regularizer, callback):
    cfg = compose_config([f"method={method}"], tmp_path / "run", tmp_path / "data")
    mixup_alpha, regularizers = resolve_regularizers(cfg.method.regularizers, cfg)
    assert mixup_alpha is None
    module = hydra.utils.instantiate(
        cfg.method.module,
        regularizers=regularizers,
        backbone="digits_cnn",
        in_chans=1,
        num_target_classes=K_T,
        num_source_classes=K_S,
        _convert_="all",
    )
    assert isinstance(module, FineTune) and module.mixup_alpha is None
    assert [type(r) for r in module.regularizers] == ([regularizer] if regularizer else [])
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.method.callbacks or {}).values()]
    assert [type(c) for c in callbacks] == ([callback] if callback else [])
