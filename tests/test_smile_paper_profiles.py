"""The paper profiles of `make reproduce-smile` carry the authors' per-data-set baseline weights.

lixingjian/SMILE ships `task_config.ini` (read by `finetune.py`); its values are written out here
by hand, with the meaning `finetune.py` gives them, and checked against the configs that every
cell of the CUB-200, Stanford Cars and FGVC-Aircraft paper profiles composes to.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import timm

from lightning_stl.callbacks.rifle import rifle_steps
from lightning_stl.method_module import resolve_regularizers
from lightning_stl.regularizers.layer_lookup import resolve_layers
from lightning_stl.run import compose_config

ROOT = Path(__file__).resolve().parents[1]

#: task_config.ini of lixingjian/SMILE, section by section.
TASK_CONFIG = {
    "fgvc_aircraft": {"l2sp": 0.001, "delta": 0.001, "rifle": 4, "bss": 0.001, "keep": False},
    "cub200": {"l2sp": 0.001, "delta": 0.01, "rifle": 2, "bss": 0.001, "keep": True},
    "stanford_cars": {"l2sp": 0.0001, "delta": 0.001, "rifle": 4, "bss": 0.001, "keep": False},
}


@pytest.fixture(scope="module")
def reproduce_smile():
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import reproduce_smile

        yield reproduce_smile
    finally:
        sys.path.remove(str(ROOT / "experiments"))


def official_rifle_reinits(max_iters: int, alpha_rifle: int) -> list[int]:
    """``FinetuneRIFLE.loss``: the head is reset in iteration ``iter_id`` (0-based) when
    ``(iter_id + 1) % (max_iters // alpha_rifle) == 0 and (iter_id + 1) < max_iters``, i.e.
    after the optimiser step numbered ``iter_id + 1``."""
    period = max_iters // alpha_rifle
    return [i + 1 for i in range(max_iters) if (i + 1) % period == 0 and i + 1 < max_iters]


@pytest.mark.parametrize("experiment", sorted(TASK_CONFIG))
def test_paper_profile_cells_use_task_config_ini(experiment, reproduce_smile, tmp_path):
    official = TASK_CONFIG[experiment]
    profile = reproduce_smile.load_profile(experiment, "paper")
    base = [f"+experiment={profile['experiment']}", *profile["overrides"]]
    setting = next(iter(profile["settings"].values()))
    seen = set()
    for method in profile["methods"]:
        overrides = reproduce_smile.cell_overrides(profile, method, setting, 3, base)
        assert overrides[-1] == "seed=3" and f"method={method}" in overrides
        cfg = compose_config(overrides, tmp_path / method)
        assert cfg.method.name == method and cfg.data.keep_aspect is official["keep"]
        _, regularizers = resolve_regularizers(cfg.method.get("regularizers") or [], cfg)
        for conf in regularizers:
            kind = conf["_target_"].rsplit(".", 1)[1]
            seen.add(kind)
            if kind == "L2SP":  # reg_weight · Σ ½‖w − w⁰‖², no head term
                assert (conf["alpha"], conf["beta"]) == (official["l2sp"], 0.0)
            elif kind == "DELTA":  # reg_delta: layer4 only, no head term
                assert conf["alpha"] == official["delta"] and conf["beta"] == 0.0
                assert conf["form"] == "smile_official" and conf["layers"] == ["layer4"]
            elif kind == "BatchSpectralShrinkage":
                assert (conf["eta"], conf["k"]) == (official["bss"], 1)
        rifle = (cfg.method.get("callbacks") or {}).get("rifle")
        if rifle is not None:
            seen.add("RIFLE")
            steps = cfg.steps.finetune
            assert steps == 9000
            assert rifle_steps(steps, rifle.times, rifle.last_fraction) == official_rifle_reinits(
                steps, official["rifle"]
            )
            assert rifle.reset_momentum is False  # the code only calls fc.reset_parameters()
    assert {"L2SP", "DELTA", "BatchSpectralShrinkage", "RIFLE"} <= seen


def test_smiles_delta_layer_is_a_module_of_timm_resnet50():
    assert resolve_layers(timm.create_model("resnet50", pretrained=False), ["layer4"]) == ["layer4"]


def test_a_method_without_overrides_gets_the_plain_cell(reproduce_smile):
    profile = {"method_overrides": {"l2sp": ["a=1"]}}
    assert reproduce_smile.cell_overrides(profile, "mixup", ["s=2"], 0, ["b=0"]) == [
        "b=0",
        "s=2",
        "method=mixup",
        "seed=0",
    ]
    assert reproduce_smile.cell_overrides(profile, "l2sp", [], 1) == [
        "method=l2sp",
        "a=1",
        "seed=1",
    ]
