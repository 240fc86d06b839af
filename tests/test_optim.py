"""Learning-rate schedule of Appendix A.3: 2.5% linear warm-up, then cosine to the final rate."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_stl.optim import SGDConfig, warmup_cosine_lr


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


def test_scheduler_applies_the_rates_step_by_step():
    model = torch.nn.Linear(2, 2)
    config = SGDConfig(lr=0.01, final_lr=1e-4, weight_decay=5e-4)
    built = config.build(model, total_steps=200)
    optimizer, scheduler = built["optimizer"], built["lr_scheduler"]["scheduler"]
    assert optimizer.param_groups[0]["momentum"] == 0.9
    assert optimizer.param_groups[0]["weight_decay"] == 5e-4
    seen = []
    for _ in range(200):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [reference_lr(s, 200, 0.01, 1e-4, 5) for s in range(200)]
    assert seen == pytest.approx(expected)


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
