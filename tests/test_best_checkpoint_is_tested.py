"""The run tests the checkpoint with the best validation accuracy, not the weights it ended with.

A callback ruins the module's weights at the start of the last validation (the target head then
predicts one class for every image), so the last validation scores badly, the best checkpoint is
an earlier one, and the run ends with the ruined weights. The ``test_acc`` of ``metrics.json``
must be the accuracy of the recorded best-validation checkpoint, recomputed here with an own
evaluation loop (own preprocessing: scale by the maximum pixel value, standardise with the target
training images' channel statistics; own argmax accuracy), and not that of the ruined weights.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch
from lightning.pytorch.callbacks import Callback

import lightning_stl.stages as stages_module
from lightning_stl.methods import SmoothTransfer
from lightning_stl.run import train

RUINED_CLASS = 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class RuinLastValidation(Callback):
    """Before the last validation: the target head answers ``RUINED_CLASS`` for every image."""

    def __init__(self):
        self.ruined_state: dict[str, torch.Tensor] | None = None

    def on_validation_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch != trainer.max_epochs - 1:
            return
        head = pl_module.model.target_head
        with torch.no_grad():
            head.weight.zero_()
            head.bias.fill_(-10.0)
            head.bias[RUINED_CLASS] = 10.0
        self.ruined_state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_fit_end(self, trainer, pl_module):
        # nothing trained after the ruin: the run ends with the ruined weights
        state = pl_module.state_dict()
        assert all(torch.equal(state[k], v) for k, v in self.ruined_state.items())


def own_test_accuracy(datamodule, state: dict[str, torch.Tensor]) -> float:
    """Target test accuracy of a SmoothTransfer state dict, by a loop written here."""
    hp = state["hyper_parameters"]
    module = SmoothTransfer(**hp)
    module.load_state_dict(state["state_dict"])
    model = module.model.eval()
    train_images = datamodule.train_sets["target"].images.to(torch.float64)
    test_set = datamodule.test_set
    max_value = float(test_set.max_value)
    mean = (train_images / max_value).mean(dim=(0, 2, 3)).float().view(1, -1, 1, 1)
    std = (train_images / max_value).std(dim=(0, 2, 3)).float().view(1, -1, 1, 1)
    correct = 0
    with torch.no_grad():
        for start in range(0, len(test_set), 128):
            images = test_set.images[start : start + 128]
            labels = test_set.labels[start : start + 128]
            x = (images.to(torch.float32) / max_value - mean) / std
            logits = model.target_head(model.backbone(x))
            correct += int((logits.argmax(dim=1) == labels).sum())
    return correct / len(test_set)


def test_metrics_report_the_best_checkpoint_not_the_last_weights(make_cfg, monkeypatch):
    """``test_acc`` is the best-validation checkpoint's accuracy, not the ruined final weights'."""
    ruin = RuinLastValidation()
    original = stages_module.stage_callbacks
    monkeypatch.setattr(stages_module, "stage_callbacks", lambda *args: [*original(*args), ruin])
    # mostly target-weighted multi-task learning: the first validations beat the ruined one
    # float32: the accuracy is recomputed below in float32, to the last image
    cfg = make_cfg(
        "method=multitask", "method.weight=0.9", "epochs.joint=3", "speed.fast_mode=false"
    )
    metrics = train(cfg)
    assert metrics["status"] == "ok" and ruin.ruined_state is not None
    assert metrics["best_step"] < metrics["total_steps"], "the ruined last validation was best"

    best_path = metrics["stages"][-1]["best_model_path"]
    assert best_path and Path(best_path).exists()
    assert Path(best_path).parent == Path(cfg.paths.output_dir) / "checkpoints" / "joint"
    best = torch.load(best_path, map_location="cpu", weights_only=True)
    assert best["global_step"] == metrics["best_step"]

    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    datamodule.setup("fit")
    best_acc = own_test_accuracy(datamodule, best)
    ruined_acc = own_test_accuracy(
        datamodule, {"hyper_parameters": best["hyper_parameters"], "state_dict": ruin.ruined_state}
    )
    ruined_expected = float((datamodule.test_set.labels == RUINED_CLASS).double().mean())
    assert ruined_acc == pytest.approx(ruined_expected)  # the ruin did what it should
    assert abs(best_acc - ruined_acc) > 0.05, "the test cannot tell the two weights apart"
    assert metrics["test_acc"] == pytest.approx(best_acc, abs=1e-6), (
        f"metrics.json test_acc={metrics['test_acc']:.4f}: the best checkpoint (step "
        f"{metrics['best_step']}) scores {best_acc:.4f}, the final ruined weights {ruined_acc:.4f}"
    )
