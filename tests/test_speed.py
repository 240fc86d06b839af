"""The fast mode (channels_last + bf16 autocast where the device has bf16 units) and the
torch.compile option (lightning_stl/speed.py)."""

from __future__ import annotations

import os

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from lightning_stl import speed
from lightning_stl.finished_run import load_module, read_run
from lightning_stl.run import compose_config, train

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "setting, fast_device, on",
    [("auto", True, True), ("auto", False, False), (True, True, True), (False, True, False)],
)
def test_fast_mode_is_on_where_the_device_has_fast_bf16(monkeypatch, setting, fast_device, on):
    monkeypatch.setattr(speed, "bf16_is_fast", lambda device: fast_device)
    assert speed.fast_mode_on(setting, CPU) is on


def test_fast_mode_true_on_a_device_without_fast_bf16_is_refused(monkeypatch):
    monkeypatch.setattr(speed, "bf16_is_fast", lambda device: False)
    with pytest.raises(ValueError, match="speed.fast_mode=true on cpu, which has no fast bf16"):
        speed.fast_mode_on(True, CPU)


def test_no_fast_bf16_on_other_devices():
    assert not speed.bf16_is_fast(torch.device("meta"))


@pytest.mark.parametrize(
    "precision, fast, expected",
    [(None, True, "bf16-mixed"), (None, False, "32-true"), ("16-mixed", True, "16-mixed")],
)
def test_an_explicit_trainer_precision_wins_over_the_fast_mode(
    monkeypatch, precision, fast, expected
):
    monkeypatch.setattr(speed, "bf16_is_fast", lambda device: fast)
    cfg = OmegaConf.create({"trainer": {"precision": precision}, "speed": {"fast_mode": "auto"}})
    decided = speed.speed_settings(cfg, CPU)
    assert decided == {"precision": expected, "channels_last": fast, "compile": False}


SMILE_TINY = [
    "+experiment=digits_smile",
    "data.source_options.num_images=400",
    "data.source_batch_size=64",
    "data.target_size=30",
    "pretraining.epochs=1",
    "steps.finetune=4",
    "val_every_n_steps=2",
    "callbacks=none",
    "trainer.enable_progress_bar=false",
]


def test_a_fast_smile_run_convolves_in_bf16_and_channels_last_teacher_included(
    tmp_path, data_dir, monkeypatch
):
    """Every convolution of the run (training, validation and test; the student's and the mean
    teacher's) computes in bf16 on NHWC tensors; the checkpoint keeps float32 weights that a float32 module loads."""
    import lightning_stl.run as run_module

    monkeypatch.setattr(speed, "bf16_is_fast", lambda device: True)
    seen: dict[str, set] = {}
    build = run_module.build_module

    def recording_build(*args, **kwargs):
        module = build(*args, **kwargs)

        def record(name):
            def hook(conv, inputs, output):
                layout = output.is_contiguous(memory_format=torch.channels_last)
                seen.setdefault(name, set()).add((output.dtype, layout))

            return hook

        for name, conv in module.named_modules():
            if isinstance(conv, nn.Conv2d) and not name.startswith("pretrained."):
                conv.register_forward_hook(record(name))
        return module

    monkeypatch.setattr(run_module, "build_module", recording_build)
    metrics = train(compose_config(SMILE_TINY, tmp_path / "run", data_dir))
    assert metrics["speed"] == {"precision": "bf16-mixed", "channels_last": True, "compile": False}
    assert any(name.startswith("teacher.") for name in seen)
    assert any(name.startswith("backbone.") for name in seen)
    for name, kinds in seen.items():
        assert kinds == {(torch.bfloat16, True)}, name
    best = metrics["stages"][-1]["best_model_path"]
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    assert all(v.dtype != torch.bfloat16 for v in state.values())  # mixed: float32 weights
    module = load_module(read_run(tmp_path / "run"))  # a float32, contiguous module loads it
    loaded = module.state_dict()
    assert set(loaded) >= {k for k in state if not k.startswith("pretrained.")}
    for key, value in state.items():
        if not key.startswith("pretrained."):
            assert torch.equal(loaded[key].float(), value.float()), key


def test_fast_mode_false_trains_in_float32(tmp_path, data_dir):
    cfg = compose_config([*SMILE_TINY, "speed.fast_mode=false"], tmp_path / "run", data_dir)
    metrics = train(cfg)
    assert metrics["speed"] == {"precision": "32-true", "channels_last": False, "compile": False}


def test_compile_models_compiles_each_model_in_place_with_its_keys(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)

    class Backbone(nn.Sequential):  # timm's interface, as FineTune's training step calls it
        def forward_features(self, x):
            return self(x)

        def forward_head(self, x, pre_logits=False):
            return x.mean(dim=(2, 3))

    class Module(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = Backbone(nn.Conv2d(1, 4, 3), nn.ReLU())
            self.head = nn.Linear(4, 2)
            self.empty = nn.Identity()

    module = Module()
    keys = list(module.state_dict())
    assert speed.compile_models(module, tmp_path / "cache") == ["backbone", "head"]
    assert list(module.state_dict()) == keys  # checkpoints unchanged
    assert module.backbone._compiled_call_impl is not None
    for method in ("forward_features", "forward_head"):  # what a fine-tuning step calls
        assert hasattr(getattr(module.backbone, method), "_torchdynamo_orig_callable"), method
    assert module.empty._compiled_call_impl is None
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache")


@pytest.mark.slow
def test_a_compiled_run_matches_an_uncompiled_one(tmp_path, data_dir):
    tiny = [
        "+experiment=digits",
        "data.source_options.num_images=400",
        "data.source_batch_size=64",
        "data.target_size=30",
        "epochs.joint=2",
        "callbacks=none",
        "trainer.enable_progress_bar=false",
        "speed.fast_mode=false",
        f"speed.compile_cache_dir={tmp_path / 'cache'}",
    ]
    plain = train(compose_config(tiny, tmp_path / "plain", data_dir))
    compiled = train(compose_config([*tiny, "speed.compile=true"], tmp_path / "compiled", data_dir))
    assert compiled["speed"]["compile"] is True
    assert compiled["best_val_acc"] == pytest.approx(plain["best_val_acc"], abs=0.02)


@pytest.mark.parametrize("capability, fast", [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_a_cuda_device_is_fast_in_bf16_from_ampere_on_asked_about_itself(
    monkeypatch, capability, fast
):
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.cuda, "get_device_capability", lambda device: asked.append(device) or capability
    )
    device = torch.device("cuda", 3)
    assert speed.bf16_is_fast(device) is fast and asked == [device]
