"""DELTA's channel weights: the "supervised attention" estimate (Li, Xiong, Wang et al. 2019).

Channel weights (the "supervised attention" of the paper). A linear classifier is trained on the
frozen pre-trained features of the target training set; then, for every layer j and channel c,
the channel's feature map is set to 0 and the increase of the cross-entropy loss is measured:
ΔL_{j,c} = L(w⁰ without channel c of layer j) − L(w⁰). The weights of a layer are

    W_{j,·} = softmax(z_{j,·} / T),  z_{j,c} = (ΔL_{j,c} − mean_c ΔL_{j,·}) / std_c ΔL_{j,·}

— the official code's normalisation (standardise per layer, temperature T = 5), where the paper
writes softmax(ΔL). Each W_{j,·} is a distribution over the C_j channels (non-negative, sum 1).

Differences to the authors' code (``github.com/lixingjian/DELTA``, ``channel_eval.py`` and
``train.py``), each chosen to keep the estimate deterministic and the backbone frozen:

* the classifier is a multinomial logistic regression on the pooled features of the pre-trained
  backbone in eval mode (no augmentation), fitted by full-batch L-BFGS with weight decay 1e-4
  from zero; the official code trains ``fc`` with SGD for 10 epochs on augmented images with
  the backbone in train mode (so its BatchNorm statistics drift);
* a channel is removed by zeroing its output map (a forward hook) instead of its conv filter;
* ΔL is the mean over ``num_images`` training images drawn with a fixed seed (official: the
  first 4 shuffled batches of 32, i.e. 128 images);
* the default layers are the modules of ``backbone.feature_info`` (stage outputs) instead of the
  last ``conv3`` of each ResNet stage (before its BatchNorm).

SMILE's code reads its channel weights from ``attention_weight/<data set>.npy`` (four layers; it
uses the last) as softmax(w / 5). The stored w are already standardised per layer (mean 0, std 1
in every layer of the three files), so that is this module's ``channel_attention`` with T = 5:
the same normalisation. The files do not say how they were made; an estimate of this kind
(DELTA's ``channel_eval.py``: zero each filter of a stage's last ``conv3`` after training a
classifier with SGD on augmented images) depends on the classifier, the images and the model,
and this module differs in all three (an L-BFGS probe, 128 drawn images, the stage's output
channel zeroed). So the estimates should rank channels by the same principle, not agree to float
precision; the authors' own files do not agree with each other either (README). Neither set of
weights is copied into this project.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_stl.regularizers.base import TargetImages
from lightning_stl.regularizers.l2sp import head_penalty

_logger = logging.getLogger(__name__)

#: Bump when the estimate changes, so that old cache files are not reused.
CACHE_VERSION = 3
#: The linear classifier of the channel estimate: weight decay (the official code's 1e-4) and
#: L-BFGS iterations.
PROBE_WEIGHT_DECAY = 1e-4
PROBE_MAX_ITER = 100
#: Seed of the draw of the ``num_images`` images the loss increases are measured on.
SUBSET_SEED = 0


def channel_attention(loss_increases: Sequence[Tensor], temperature: float = 5.0) -> list[Tensor]:
    """Channel weights ``[C_j]`` per layer from the loss increases ΔL ``[C_j]``: softmax of the
    standardised increases divided by ``temperature`` (the official code's normalisation). A
    layer whose increases are all equal (std 0) gets uniform weights."""
    weights = []
    for j, increase in enumerate(loss_increases):
        increase = torch.as_tensor(increase).detach().to(torch.float64).flatten()
        if increase.numel() == 0 or not torch.isfinite(increase).all():
            raise ValueError(f"DELTA layer {j}: loss increases must be finite, got {increase}")
        std = increase.std(unbiased=False)
        centred = increase - increase.mean()
        z = centred / std if std > 0 else torch.zeros_like(increase)
        weights.append(torch.softmax(z / temperature, dim=0).float())
    return weights


def pooled_features(backbone: nn.Module, x: Tensor) -> Tensor:
    """Pooled features ``[B, F]`` as :class:`~lightning_stl.methods.FineTune` computes them."""
    return backbone.forward_head(backbone.forward_features(x), pre_logits=True)


def _zero_channel(channel: int, module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
    output = output.clone()
    output[:, channel] = 0
    return output


def fit_probe(features: Tensor, labels: Tensor, num_classes: int) -> nn.Linear:
    """The linear classifier ``[num_classes, F]`` of the channel estimate: multinomial logistic
    regression on ``features`` ``[N, F]`` with weight decay :data:`PROBE_WEIGHT_DECAY` on weight
    and bias, full-batch L-BFGS from zero (deterministic). Returned frozen."""
    head = nn.Linear(features.shape[1], num_classes).to(features)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.LBFGS(
        head.parameters(), lr=1.0, max_iter=PROBE_MAX_ITER, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(head(features), labels)
        loss = loss + 0.5 * PROBE_WEIGHT_DECAY * head_penalty(head)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return head.requires_grad_(False)


def channel_loss_increases(
    backbone: nn.Module,
    head: nn.Module,
    layers: Sequence[str],
    images: Tensor,
    labels: Tensor,
    batch_size: int = 256,
) -> list[Tensor]:
    """ΔL ``[C_j]`` per layer: the mean cross-entropy of ``head(pooled_features(backbone, x))``
    on ``images`` ``[N, C, H, W]`` with channel c of layer j set to 0, minus the one without.

    ``backbone`` must be frozen and in eval mode; runs under ``torch.no_grad``.
    """
    modules = dict(backbone.named_modules())
    shapes: dict[str, tuple[int, ...]] = {}

    def loss() -> float:
        total = 0.0
        for start in range(0, len(images), batch_size):
            x, y = images[start : start + batch_size], labels[start : start + batch_size]
            logits = head(pooled_features(backbone, x))
            total += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        return total / len(images)

    def record(name: str, module: nn.Module, inputs: Any, output: Any) -> None:
        shapes[name] = tuple(output.shape) if isinstance(output, Tensor) else ()

    with torch.no_grad():
        handles = [modules[n].register_forward_hook(functools.partial(record, n)) for n in layers]
        try:
            base = loss()
        finally:
            for handle in handles:
                handle.remove()
        increases = []
        for name in layers:
            shape = shapes.get(name)
            if shape is None or len(shape) != 4:
                got = "no output" if shape is None else f"shape {shape or 'not a tensor'}"
                raise ValueError(
                    f"DELTA layer {name!r} must give a feature map [B, C, h, w] in the "
                    f"backbone's forward, got {got}; choose convolutional layers"
                )
            increase = torch.empty(shape[1], dtype=torch.float64)
            for channel in range(shape[1]):
                hook = functools.partial(_zero_channel, channel)
                handle = modules[name].register_forward_hook(hook)
                try:
                    increase[channel] = loss() - base
                finally:
                    handle.remove()
            increases.append(increase)
    return increases


def tensor_bytes(tensor: Tensor) -> bytes:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def _state_fingerprint(digest: Any, backbone: nn.Module) -> None:
    digest.update(type(backbone).__name__.encode())
    for key, value in sorted(backbone.state_dict().items()):
        digest.update(f"{key}{tuple(value.shape)}{value.dtype}".encode())
        digest.update(tensor_bytes(value))


def cache_file(
    cache_dir: Path | None,
    pretrained: nn.Module,
    layers: Sequence[str],
    num_images: int | None,
    num_classes: int,
    data_key: str,
) -> Path | None:
    """``<cache_dir>/delta-<hash>.pt`` of this pre-trained backbone, these layers and settings,
    and the training images (``data_key``, see :class:`~lightning_stl.regularizers.FineTuneSetup`);
    ``None`` (no cache) without a folder or a key."""
    if cache_dir is None or not data_key:
        return None
    digest = hashlib.sha256(f"delta-v{CACHE_VERSION}".encode())
    settings = (list(layers), num_images, num_classes, PROBE_WEIGHT_DECAY, PROBE_MAX_ITER)
    digest.update(repr((*settings, SUBSET_SEED)).encode())
    digest.update(f"data{data_key}".encode())
    _state_fingerprint(digest, pretrained)
    return Path(cache_dir) / f"delta-{digest.hexdigest()[:32]}.pt"


def estimate_loss_increases(
    pretrained: nn.Module,
    layers: Sequence[str],
    target_images: TargetImages,
    num_target_images: int,
    num_classes: int,
    num_images: int | None = 128,
    device: torch.device | None = None,
) -> list[Tensor]:
    """ΔL ``[C_j]`` per layer on the target training set: the classifier is fitted on the frozen
    model's pooled features of every training image, the increases are measured on
    ``num_images`` of them drawn with :data:`SUBSET_SEED` (see :func:`fit_probe`,
    :func:`channel_loss_increases`)."""
    if num_target_images == 0:
        raise ValueError("DELTA needs target training images, the training set is empty")
    home = _param_device(pretrained)
    frozen = pretrained.eval().to(device or home)
    try:  # the snapshot is shared: it goes back where it was
        return _estimate(frozen, layers, target_images, num_target_images, num_classes, num_images)
    finally:
        pretrained.to(home)


def _estimate(
    frozen: nn.Module,
    layers: Sequence[str],
    target_images: TargetImages,
    num_target_images: int,
    num_classes: int,
    num_images: int | None,
) -> list[Tensor]:
    device = _param_device(frozen)
    count = num_target_images if num_images is None else min(num_images, num_target_images)
    generator = torch.Generator().manual_seed(SUBSET_SEED)
    chosen = torch.zeros(num_target_images, dtype=torch.bool)
    chosen[torch.randperm(num_target_images, generator=generator)[:count]] = True
    features, labels, images, image_labels = [], [], [], []
    offset = 0
    with torch.no_grad():
        for x, y in target_images(device):
            features.append(pooled_features(frozen, x).float())
            labels.append(y)
            keep = chosen[offset : offset + len(y)].to(device)
            images.append(x[keep])
            image_labels.append(y[keep])
            offset += len(y)
    targets = torch.cat(labels)
    if int(targets.min()) < 0 or int(targets.max()) >= num_classes:
        raise ValueError(
            f"DELTA: training labels lie in [{int(targets.min())}, {int(targets.max())}], "
            f"but the target head has {num_classes} classes"
        )
    probe = fit_probe(torch.cat(features), targets, num_classes)
    _logger.info("DELTA: estimating %d layers' channel weights on %d images", len(layers), count)
    return channel_loss_increases(frozen, probe, layers, torch.cat(images), torch.cat(image_labels))


def cached_loss_increases(path: Path | None, layers: Sequence[str], estimate: Any) -> list[Tensor]:
    """The loss increases of ``layers`` read from ``path``, else ``estimate()`` (under a forked
    RNG: the data loader draws seeds) written there atomically (parallel runs never read half a
    file)."""
    if path is not None and path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if stored.get("layers") == list(layers):
            _logger.info("DELTA channel weights read from %s", path)
            return list(stored["loss_increases"])
        _logger.warning("DELTA cache %s is for other layers; estimating again", path)
    with torch.random.fork_rng(devices=[]):
        increases = estimate()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save({"layers": list(layers), "loss_increases": increases}, partial)
        os.replace(partial, path)
        _logger.info("DELTA channel weights cached in %s", path)
    return increases


def _param_device(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    if param is None:
        param = next(module.buffers(), None)
    return param.device if param is not None else torch.device("cpu")
