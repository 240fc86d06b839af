"""Two heads on one backbone (Eq. 1–2), both BatchNorm modes, and the mini-batch loss (Eq. 3)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from lightning_stl.methods.smooth_transfer import smooth_transfer_loss
from lightning_stl.models.domain_batchnorm import DomainBatchNorm
from lightning_stl.models.source_target import SourceTargetClassifier


class TinyBackbone(nn.Module):
    """conv → BN → ReLU → mean-pool; exposes the BN layer for the tests."""

    num_features = 4

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))


def make(mode: str) -> SourceTargetClassifier:
    torch.manual_seed(0)
    return SourceTargetClassifier(TinyBackbone(), 3, 5, batchnorm=mode)


def batch_stats(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and unbiased variance, in numpy."""
    a = x.detach().numpy().transpose(1, 0, 2, 3).reshape(x.shape[1], -1)
    return a.mean(axis=1), a.var(axis=1, ddof=1)


def normalise(x: torch.Tensor, mean: np.ndarray, var: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    a = x.detach().numpy()
    return (a - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + eps)


def test_heads_have_their_own_class_counts():
    model = make("shared")
    t, s = model(torch.randn(6, 2, 5, 5), torch.randn(7, 2, 5, 5))
    assert t.shape == (6, 3) and s.shape == (7, 5)
    t_only, none = model(torch.randn(2, 2, 5, 5))
    assert t_only.shape == (2, 3) and none is None
    none, s_only = model(None, torch.randn(2, 2, 5, 5))
    assert none is None and s_only.shape == (2, 5)


def test_per_domain_mode_normalises_each_sub_batch_with_its_own_statistics():
    model = make("per_domain")
    norm = model.backbone.bn
    assert isinstance(norm, DomainBatchNorm)
    xt, xs = torch.randn(6, 2, 5, 5) * 3 + 2, torch.randn(9, 2, 5, 5) - 1
    captured = {}
    model.backbone.conv.register_forward_hook(lambda m, i, o: captured.setdefault("conv", o))
    model.backbone.bn.register_forward_hook(lambda m, i, o: captured.setdefault("bn", o))
    model.train()
    model(xt, xs)
    conv, out = captured["conv"], captured["bn"]
    ct, cs = conv[:6], conv[6:]
    mt, vt = batch_stats(ct)
    ms, vs = batch_stats(cs)
    n_t, n_s = ct.numel() / 4, cs.numel() / 4
    biased = lambda v, n: v * (n - 1) / n  # noqa: E731  (batch norm divides by n in training)
    np.testing.assert_allclose(
        out[:6].detach().numpy(), normalise(ct, mt, biased(vt, n_t)), atol=1e-4
    )
    np.testing.assert_allclose(
        out[6:].detach().numpy(), normalise(cs, ms, biased(vs, n_s)), atol=1e-4
    )
    # running statistics: momentum 0.1 from (0, 1), each domain from its own sub-batch
    np.testing.assert_allclose(norm.norm.running_mean.numpy(), 0.1 * mt, atol=1e-5)
    np.testing.assert_allclose(norm.source_running_mean.numpy(), 0.1 * ms, atol=1e-5)
    np.testing.assert_allclose(norm.norm.running_var.numpy(), 0.9 + 0.1 * vt, atol=1e-4)
    np.testing.assert_allclose(norm.source_running_var.numpy(), 0.9 + 0.1 * vs, atol=1e-4)
    assert int(norm.norm.num_batches_tracked) == 1 and int(norm.source_num_batches_tracked) == 1


def test_per_domain_evaluation_uses_the_target_statistics():
    model = make("per_domain")
    model.train()
    for _ in range(3):
        model(torch.randn(6, 2, 5, 5) + 3, torch.randn(6, 2, 5, 5) - 3)
    model.eval()
    x = torch.randn(4, 2, 5, 5)
    captured = {}
    model.backbone.conv.register_forward_hook(lambda m, i, o: captured.setdefault("conv", o))
    model.backbone.bn.register_forward_hook(lambda m, i, o: captured.setdefault("bn", o))
    with torch.no_grad():
        model(x)
    norm = model.backbone.bn
    expected = normalise(
        captured["conv"], norm.norm.running_mean.numpy(), norm.norm.running_var.numpy()
    )
    np.testing.assert_allclose(captured["bn"].numpy(), expected, atol=1e-4)
    assert not np.allclose(norm.norm.running_mean.numpy(), norm.source_running_mean.numpy())


def test_shared_mode_normalises_the_mixed_batch_together():
    model = make("shared")
    xt, xs = torch.randn(6, 2, 5, 5) * 3 + 2, torch.randn(9, 2, 5, 5) - 1
    captured = {}
    model.backbone.conv.register_forward_hook(lambda m, i, o: captured.setdefault("conv", o))
    model.backbone.bn.register_forward_hook(lambda m, i, o: captured.setdefault("bn", o))
    model.train()
    model(xt, xs)
    conv = captured["conv"]
    m, v = batch_stats(conv)
    n = conv.numel() / 4
    np.testing.assert_allclose(
        captured["bn"].detach().numpy(), normalise(conv, m, v * (n - 1) / n), atol=1e-4
    )
    np.testing.assert_allclose(model.backbone.bn.running_mean.numpy(), 0.1 * m, atol=1e-5)


@pytest.mark.parametrize("mode", ["shared", "per_domain"])
def test_both_modes_survive_a_state_dict_round_trip(mode):
    model = make(mode)
    model.train()
    for _ in range(2):
        model(torch.randn(5, 2, 5, 5) + 1, torch.randn(5, 2, 5, 5) - 2)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = make(mode)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    for (name, a), (_, b) in zip(
        model.state_dict().items(), fresh.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    if mode == "per_domain":
        assert "backbone.bn.source_running_mean" in fresh.state_dict()
    model.eval(), fresh.eval()
    x = torch.randn(3, 2, 5, 5)
    assert torch.equal(model(x)[0], fresh(x)[0])


def test_unknown_batchnorm_mode_is_rejected():
    with pytest.raises(ValueError, match=r"batchnorm='domain'.*shared, per_domain"):
        SourceTargetClassifier(TinyBackbone(), 3, 5, batchnorm="domain")


def reference_eq3(zt, yt, zs, ys, lam):
    """Eq. 3 from the definition: mean over each sub-batch of −log softmax at the label."""

    def ce(z, y):
        z = np.asarray(z, dtype=np.float64)
        logp = (
            z
            - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
            - z.max(1, keepdims=True)
        )
        return -logp[np.arange(len(y)), y].mean()

    return lam * ce(zt, yt) + (1 - lam) * ce(zs, ys)


@pytest.mark.parametrize("lam", [0.0, 0.25, 0.5, 1.0])
def test_eq3_matches_an_independent_computation(lam):
    zt = [[2.0, -1.0, 0.5], [0.1, 0.2, 0.3]]
    yt = [0, 2]
    zs = [[1.0, 0.0, 0.0, 3.0, -2.0], [0.0, 0.0, 0.0, 0.0, 0.0], [5.0, 1.0, 1.0, 1.0, 1.0]]
    ys = [3, 1, 0]
    loss, parts = smooth_transfer_loss(
        torch.tensor(zt), torch.tensor(yt), torch.tensor(zs), torch.tensor(ys), lam
    )
    assert loss.item() == pytest.approx(reference_eq3(zt, yt, zs, ys, lam), rel=1e-6)
    assert set(parts) == (
        {"target"} if lam == 1 else {"source"} if lam == 0 else {"target", "source"}
    )


def test_eq3_skips_a_zero_weighted_sub_batch():
    zt = torch.tensor([[2.0, -1.0, 0.5]], requires_grad=True)
    loss, _ = smooth_transfer_loss(zt, torch.tensor([1]), None, None, 1.0)
    loss.backward()
    assert zt.grad is not None
    with pytest.raises(ValueError, match="needs a source sub-batch"):
        smooth_transfer_loss(zt, torch.tensor([1]), None, None, 0.5)
