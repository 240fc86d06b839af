"""Learning-rate schedule of Appendix A.3: 2.5% linear warm-up, then cosine to the final rate."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_stl.optim import SGDConfig, warmup_cosine_lr, warmup_step_lr


def reference_lr(step: int, total: int, peak: float, final: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / (total - warmup - 1)
    return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * progress))


def test_warmup_cosine_matches_reference_and_endpoints():
    total, peak, final = 400, 0.1, 1e-3
    warmup = 10  # 2.5% of 400
    for step in range(total):
        assert warmup_cosine_lr(step, total, peak, final, 0.025) == pytest.approx(
            reference_lr(step, total, peak, final, warmup)
        )
    assert warmup_cosine_lr(0, total, peak, final, 0.025) == pytest.approx(peak / warmup)
    assert warmup_cosine_lr(warmup - 1, total, peak, final, 0.025) == pytest.approx(peak)
    assert warmup_cosine_lr(total - 1, total, peak, final, 0.025) == pytest.approx(final)


@pytest.mark.parametrize(("total", "warmup_fraction"), [(200, 0.025), (40, 0.025), (30, 0.0)])
def test_scheduler_applies_the_rates_step_by_step(total: int, warmup_fraction: float):
    """torch's LinearLR + CosineAnnealingLR give Eq. A.3's rate at every step, for a warm-up of
    5 steps, of 1 step (already at the peak) and of none."""
    model = torch.nn.Linear(2, 2)
    config = SGDConfig(lr=0.01, final_lr=1e-4, weight_decay=5e-4, warmup_fraction=warmup_fraction)
    built = config.build(model, total_steps=total)
    optimizer, scheduler = built["optimizer"], built["lr_scheduler"]["scheduler"]
    assert optimizer.param_groups[0]["momentum"] == 0.9
    assert optimizer.param_groups[0]["weight_decay"] == 5e-4
    seen = []
    for _ in range(total):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    warmup = 0 if warmup_fraction == 0 else max(1, round(warmup_fraction * total))
    expected = [reference_lr(s, total, 0.01, 1e-4, warmup) for s in range(total)]
    assert seen == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lr", 0.0),
        ("final_lr", 1.0),
        ("momentum", 1.0),
        ("weight_decay", -1.0),
        ("warmup_fraction", 1.0),
    ],
)
def test_bad_optimizer_settings_are_rejected(field, value):
    with pytest.raises(ValueError, match=rf"optimizer.{field}="):
        SGDConfig(**{field: value})


# ---------------------------------------------------------------------------- SMILE's step schedule


def stepped_rates(config: SGDConfig, total: int) -> list[float]:
    """The learning rate of each optimiser step, read from the optimiser that ``build`` returns."""
    model = torch.nn.Linear(2, 1)
    built = config.build(model, total_steps=total)
    optimizer, scheduler = built["optimizer"], built["lr_scheduler"]["scheduler"]
    assert built["lr_scheduler"]["interval"] == "step"
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("total", [6, 9, 10, 600])
def test_step_schedule_divides_the_rate_by_ten_after_two_thirds(total):
    config = SGDConfig(lr=0.01, schedule="step", warmup_fraction=0.0)
    assert config.milestones == (2 / 3,) and config.gamma == 0.1
    switch = round(2 / 3 * total)
    expected = [0.01 if step < switch else 0.001 for step in range(total)]
    assert stepped_rates(config, total) == pytest.approx(expected, rel=1e-12)


def test_the_sgd_step_config_is_smiles_schedule():
    from omegaconf import OmegaConf

    from tests.conftest import ROOT

    conf = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "optimizer" / "sgd_step.yaml"))
    config = SGDConfig(**conf)
    assert (config.lr, config.momentum, config.weight_decay) == (0.01, 0.9, 1e-4)
    rates = stepped_rates(config, 9000)  # SMILE: 9,000 iterations
    assert rates[0] == pytest.approx(0.01) and rates[5999] == pytest.approx(0.01)
    assert rates[6000] == pytest.approx(0.001) and rates[-1] == pytest.approx(0.001)
    assert sorted(set(round(r, 12) for r in rates)) == [0.001, 0.01]


def test_step_schedule_with_warmup_and_two_milestones():
    config = SGDConfig(
        lr=0.02, schedule="step", warmup_fraction=0.1, milestones=[0.5, 0.75], gamma=0.5
    )
    total = 40
    expected = []
    for step in range(total):
        if step < 4:  # warm-up: 10% of 40 steps
            expected.append(0.02 * (step + 1) / 4)
        else:
            expected.append(0.02 * 0.5 ** ((step >= 20) + (step >= 30)))
    assert stepped_rates(config, total) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (
            {"schedule": "cosine"},
            r"optimizer.schedule='cosine' is not allowed.*warmup_cosine, step",
        ),
        ({"schedule": "Step"}, r"optimizer.schedule='Step'"),
        ({"schedule": "step", "milestones": [0.0]}, r"optimizer.milestones=\[0.0\] is not allowed"),
        ({"schedule": "step", "milestones": [1.0]}, r"optimizer.milestones=\[1.0\]"),
        ({"schedule": "step", "milestones": [0.5, 1.5]}, r"optimizer.milestones=\[0.5, 1.5\]"),
        ({"schedule": "step", "milestones": [-0.2]}, r"optimizer.milestones=\[-0.2\]"),
        ({"schedule": "step", "milestones": ["0.5"]}, r"optimizer.milestones=\['0.5'\]"),
        ({"schedule": "step", "milestones": [True]}, r"optimizer.milestones=\[True\]"),
        ({"schedule": "step", "gamma": 0.0}, r"optimizer.gamma=0.0 is not allowed"),
        ({"schedule": "step", "gamma": 1.5}, r"optimizer.gamma=1.5 is not allowed"),
    ],
)
def test_bad_step_schedule_settings_are_rejected(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        SGDConfig(**kwargs)


def test_a_scalar_milestone_is_rejected_with_a_clear_message():
    with pytest.raises(ValueError, match=r"optimizer.milestones=0.5"):
        SGDConfig(schedule="step", milestones=0.5)


@pytest.mark.parametrize(
    ("total", "options"),
    [
        (1, {"warmup_fraction": 0.0}),  # one step: the final rate
        (2, {}),  # one warm-up step, one at the final rate
        (3, {"warmup_fraction": 0.0}),
        (3, {"schedule": "step", "warmup_fraction": 0.0, "milestones": [0.6, 0.7]}),  # one step
        (20, {"schedule": "step", "warmup_fraction": 0.5, "milestones": [0.1, 0.3]}),  # in warm-up
        (41, {"schedule": "step", "warmup_fraction": 0.1, "milestones": [0.5, 0.75]}),
    ],
)
def test_torch_schedulers_give_the_closed_forms_at_the_edges(total: int, options: dict):
    config = SGDConfig(lr=0.01, final_lr=1e-4, **options)
    if config.schedule == "step":
        expected = [
            warmup_step_lr(s, total, 0.01, config.warmup_fraction, config.milestones, config.gamma)
            for s in range(total)
        ]
    else:
        expected = [
            warmup_cosine_lr(s, total, 0.01, 1e-4, config.warmup_fraction) for s in range(total)
        ]
    assert stepped_rates(config, total) == pytest.approx(expected, rel=1e-12)


class OldWarmupCosineFactor:
    """What a checkpoint of the LambdaLR version keeps of its factor: these attributes."""

    def __init__(self, total_steps: int, peak_lr: float, final_lr: float, warmup_fraction: float):
        self.total_steps, self.peak_lr = total_steps, peak_lr
        self.final_lr, self.warmup_fraction = final_lr, warmup_fraction

    def __call__(self, step: int) -> float:
        lr = warmup_cosine_lr(step, self.total_steps, self.peak_lr, self.final_lr, 0.025)
        return lr / self.peak_lr


def test_a_checkpoint_with_the_old_lambda_lr_state_resumes_on_the_same_rates():
    from lightning_stl.methods import SmoothTransfer

    total, stopped = 200, 77
    config = SGDConfig(lr=0.01, final_lr=1e-4)
    old_optimizer = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.01)
    old = torch.optim.lr_scheduler.LambdaLR(
        old_optimizer, OldWarmupCosineFactor(total, 0.01, 1e-4, 0.025)
    )
    for _ in range(stopped):
        old_optimizer.step()
        old.step()
    checkpoint = {"lr_schedulers": [old.state_dict()]}
    SmoothTransfer(optimizer={"lr": 0.01, "final_lr": 1e-4}).on_load_checkpoint(checkpoint)
    (state,) = checkpoint["lr_schedulers"]
    assert "lr_lambdas" not in state
    built = config.build(torch.nn.Linear(2, 1), total_steps=total)
    optimizer, scheduler = built["optimizer"], built["lr_scheduler"]["scheduler"]
    optimizer.load_state_dict(old_optimizer.state_dict())  # as Lightning restores both
    scheduler.load_state_dict(state)
    rates = []
    for _ in range(stopped, total):
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    expected = [warmup_cosine_lr(s, total, 0.01, 1e-4, 0.025) for s in range(stopped + 1, total)]
    assert rates[:-1] == pytest.approx(expected, rel=1e-12)
