"""The search, launcher and trainer configs compose as documented."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from tests.conftest import CONF_DIR


def compose_with_hydra(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_smooth_tpe_searches_omega_as_the_paper_does():
    cfg = compose_with_hydra("hparams_search=smooth_tpe", "+experiment=digits")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("DurableOptunaSweeper")
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed == 0
    assert (sweeper.n_trials, sweeper.n_jobs, sweeper.direction) == (99, 11, "maximize")
    params = sweeper.params
    assert params["method.target_weight.tau"].startswith("tag(log")
    assert (
        "log" not in params["method.target_weight.t0"]
        and "log" not in params["method.target_weight.alpha"]
    )
    assert cfg.method.name == "smooth" and cfg.method.target_weight.relative is True
    assert cfg.hydra.mode.name == "MULTIRUN"


def test_search_ranges_reach_both_extremes_of_figure_1():
    from lightning_stl.schedule import SigmoidTargetWeight

    T = 1000
    # the smallest τ gives a step anywhere in [0, T] ...
    for t0 in (-0.49, 0.0, 0.49):
        curve = SigmoidTargetWeight(t0=t0, tau=1e-4, alpha=0.0).curve(T)
        assert curve.min() < 1e-3 and curve.max() > 1 - 1e-3
    # ... and the largest τ a weight that is nearly constant, anywhere in (0, 1) by α
    for alpha in (-6.0, 0.0, 6.0):
        curve = SigmoidTargetWeight(t0=0.0, tau=10.0, alpha=alpha).curve(T)
        assert curve.max() - curve.min() < 0.03
    assert SigmoidTargetWeight(tau=10.0, alpha=6.0).curve(T).mean() < 0.01
    assert SigmoidTargetWeight(tau=10.0, alpha=-6.0).curve(T).mean() > 0.99


def test_multitask_tpe_searches_the_fixed_weight():
    cfg = compose_with_hydra("hparams_search=multitask_tpe")
    assert cfg.method.name == "multitask"
    assert "method.weight" in cfg.hydra.sweeper.params


def test_parallel_launcher_is_joblib_with_processes():
    cfg = compose_with_hydra(
        "hparams_search=smooth_tpe", "hydra/launcher=parallel", "hydra.launcher.n_jobs=4"
    )
    assert "joblib" in cfg.hydra.launcher._target_.lower() and cfg.hydra.launcher.n_jobs == 4


def test_slurm_launcher_asks_one_gpu_per_trial():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose_with_hydra("hparams_search=smooth_tpe", "hydra/launcher=slurm")
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.tasks_per_node == 1


def test_ddp_trainer():
    cfg = compose_with_hydra("trainer=ddp")
    assert cfg.trainer.strategy == "ddp_find_unused_parameters_true"
    assert cfg.trainer.use_distributed_sampler is False


def test_smile_official_is_the_authors_finetune_py():
    """lixingjian/SMILE ``FinetuneSMILE``: reg_weight_fea 0.01, reg_weight_fc 0.1, alpha 0.2, λ
    folded, ema_decay 0.999 every 10 iterations inside the step, ``named_parameters()`` only, the
    classifier kept; the paper form keeps γ_FE = 0.1 and averages BatchNorm statistics."""
    official = compose_with_hydra("+experiment=digits_smile", "method=smile_official").method
    module, teacher = official.module, official.callbacks.mean_teacher
    assert (module.feature_mixup_weight, module.label_mixup_weight) == (0.01, 0.1)
    assert module.mixup_alpha == 0.2 and module.fold_mixup_weight is True
    assert (module.feature_mixup_form, module.label_mixup_form) == ("official", "official")
    assert (teacher.decay, teacher.every_n_steps) == (0.999, 10)
    assert teacher.update_before_step is True and teacher.average_buffers is False
    assert teacher.include_classifier is False
    paper = compose_with_hydra("+experiment=digits_smile", "method=smile").method
    assert paper.module.feature_mixup_weight == 0.1 and paper.module.fold_mixup_weight is False
    assert paper.callbacks.mean_teacher.average_buffers is True
    assert paper.callbacks.mean_teacher.update_before_step is False


def test_a_callback_entry_without_a_target_is_refused_with_its_key():
    from lightning_stl.instantiators import instantiate_group

    assert instantiate_group({"off": None}, "callbacks") == []
    with pytest.raises(ValueError, match=r"callbacks\.bar=5 is not allowed: .*_target_"):
        instantiate_group({"bar": 5}, "callbacks")
    built = instantiate_group(
        {"timer": {"_target_": "lightning.pytorch.callbacks.Timer", "duration": "00:00:01:00"}},
        "callbacks",
    )
    assert [type(c).__name__ for c in built] == ["Timer"]
