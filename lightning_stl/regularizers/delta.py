"""DELTA: feature-map regularisation with channel attention (Li, Xiong, Wang et al., ICLR 2019).

"DELTA: DEep Learning Transfer using Feature Map with Attention for Convolutional Networks",
the attention-weighted behavioural regulariser Ω: the student w is kept close to the pre-trained
model w⁰ *in behaviour*, through the outer feature maps FM_j ``[B, C_j, h_j, w_j]`` of chosen
layers on the same images x ``[B, C, H, W]``, each channel c weighted by how much the pre-trained
model needs it for the target task:

    Ω(w) = α · Σ_j Σ_c W_{j,c} · ‖FM_{j,c}(w, x) − FM_{j,c}(w⁰, x)‖²₂  +  β/2 · ‖w_S̄‖²₂

with w_S̄ the new target head (:func:`~lightning_stl.regularizers.l2sp.head_penalty`).

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

The distance has three forms (``form``), all with α and β outside:

==================  ==========================================================================
``paper``           mean over the batch of Σ_j Σ_c W_{j,c} ‖ΔFM_{j,c}‖²₂ (‖·‖² summed over h,
                    w): the equation as printed, a per-image Ω averaged like the cross-entropy
``official``        ½ · Σ_batch Σ_j Σ_c C_j · W_{j,c} · ‖ΔFM_{j,c}‖²₂ / (h·w):
                    ``reg_att_fea_map`` of the DELTA authors' code. C_j·W averages 1, so uniform
                    attention is the plain squared distance per pixel; it SUMS over the batch
                    (the cross-entropy is a mean), so for a batch of B it is B/2 times a batch
                    mean
``smile_official``  Σ_batch Σ_j Σ_c W_{j,c} · ‖ΔFM_{j,c}‖²₂ / (h·w): ``FinetuneDELTA.reg_delta``
                    of SMILE's code (lixingjian/SMILE ``finetune.py``), which ran DELTA as a
                    baseline on ResNet-50's ``layer4`` output only, without the head term; its
                    per-data-set α (``alpha_delta`` of ``task_config.ini``) is meant for this
                    form: use it with ``layers=[layer4]`` and ``beta=0``
==================  ==========================================================================

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

import copy
import functools
import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_stl.regularizers.base import FineTuneStep, Regularizer
from lightning_stl.regularizers.l2sp import head_penalty
from lightning_stl.regularizers.smile import check_loss_weight

if TYPE_CHECKING:  # pragma: no cover
    from lightning_stl.methods.finetune import FineTune

_logger = logging.getLogger(__name__)

FORMS = ("paper", "official", "smile_official")
#: Bump when the estimate changes, so that old cache files are not reused.
CACHE_VERSION = 2
#: The linear classifier of the channel estimate: weight decay (the official code's 1e-4) and
#: L-BFGS iterations.
PROBE_WEIGHT_DECAY = 1e-4
PROBE_MAX_ITER = 100
#: Seed of the draw of the ``num_images`` images the loss increases are measured on.
SUBSET_SEED = 0
_WEIGHT = "channel_weight_"
_MAX_NAMES_SHOWN = 40


# ---------------------------------------------------------------------------- the penalty
def attention_distance(
    student_maps: Sequence[Tensor],
    frozen_maps: Sequence[Tensor],
    channel_weights: Sequence[Tensor],
    form: str = "paper",
) -> Tensor:
    """Σ_j Σ_c W_{j,c} ‖FM_{j,c}(w, x) − FM_{j,c}(w⁰, x)‖²₂ reduced over the batch (scalar).

    ``student_maps[j]`` and ``frozen_maps[j]`` are the maps ``[B, C_j, h_j, w_j]`` of layer j,
    ``channel_weights[j]`` its weights ``[C_j]``. ``form="paper"``: ‖·‖² summed over h, w, mean
    over the batch; ``form="official"``: C_j · W_{j,c} · ‖·‖² / (h·w), ½ · sum over the batch;
    ``form="smile_official"``: W_{j,c} · ‖·‖² / (h·w), summed over the batch.
    The frozen maps are detached; the distance is computed in float32 (or wider).
    """
    _check_form(form)
    if not len(student_maps) == len(frozen_maps) == len(channel_weights):
        raise ValueError(
            f"DELTA got {len(student_maps)} student maps, {len(frozen_maps)} frozen maps and "
            f"{len(channel_weights)} channel weights; one of each per layer"
        )
    total: Tensor | None = None
    for j, (student, frozen, weight) in enumerate(
        zip(student_maps, frozen_maps, channel_weights, strict=True)
    ):
        if student.ndim != 4 or student.shape != frozen.shape:
            raise ValueError(
                f"DELTA layer {j}: needs two feature maps [B, C, h, w] of the same shape, got "
                f"{tuple(student.shape)} (student) and {tuple(frozen.shape)} (frozen)"
            )
        _, channels, height, width = student.shape
        if tuple(weight.shape) != (channels,):
            raise ValueError(
                f"DELTA layer {j}: the map has {channels} channels but the channel weights have "
                f"shape {tuple(weight.shape)}"
            )
        dtype = torch.promote_types(student.dtype, torch.float32)
        squared = (student.to(dtype) - frozen.detach().to(dtype)).pow(2).flatten(2).sum(2)
        if form == "official":
            squared = squared * (channels / (height * width))
        elif form == "smile_official":
            squared = squared / (height * width)
        per_image = (squared * weight.to(squared)).sum(1)  # [B]
        total = per_image if total is None else total + per_image
    if total is None:
        raise ValueError("DELTA needs at least one layer")
    if form == "paper":
        return total.mean()
    return 0.5 * total.sum() if form == "official" else total.sum()


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


# ---------------------------------------------------------------------------- layers and models
def default_layers(backbone: nn.Module) -> list[str]:
    """The modules of ``backbone.feature_info`` (timm's list of ``{"module": name, ...}``, or a
    ``FeatureInfo``): the stage outputs."""
    info = getattr(backbone, "feature_info", None)
    if info is None:
        raise ValueError(
            f"DELTA layers=null takes the modules of backbone.feature_info, but "
            f"{type(backbone).__name__} has none: name the layers, e.g. "
            f"layers=[{', '.join(_children(backbone, '')[:3])}]; {_listing(backbone, '')}"
        )
    if hasattr(info, "module_name"):
        return list(info.module_name())
    return [entry["module"] for entry in info]


def resolve_layers(backbone: nn.Module, layers: Sequence[str] | None) -> list[str]:
    """``layers`` (or :func:`default_layers`) after checking that each names a sub-module."""
    names = default_layers(backbone) if layers is None else list(layers)
    modules = dict(backbone.named_modules())
    for name in names:
        if not name or name not in modules:
            parent = _deepest_parent(modules, name)
            raise ValueError(
                f"DELTA layers: {name!r} is not a module of the backbone "
                f"{type(backbone).__name__}; {_listing(backbone, parent)}"
            )
    return names


def _deepest_parent(modules: dict[str, nn.Module], name: str) -> str:
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in modules:
            return prefix
    return ""


def _children(backbone: nn.Module, parent: str) -> list[str]:
    module = backbone.get_submodule(parent) if parent else backbone
    return [f"{parent}.{name}" if parent else name for name, _ in module.named_children()]


def _listing(backbone: nn.Module, parent: str) -> str:
    names = _children(backbone, parent)
    shown = ", ".join(names[:_MAX_NAMES_SHOWN])
    if len(names) > _MAX_NAMES_SHOWN:
        shown += f", ... ({len(names)} in all)"
    where = f"the modules in {parent!r} are" if parent else "its top-level modules are"
    return f"{where}: {shown} (nested modules as 'parent.child', e.g. 'layer1.0')"


def frozen_copy(backbone: nn.Module) -> nn.Module:
    """A deep copy of ``backbone`` without forward hooks, ``requires_grad=False``, in eval mode."""
    stashed = []
    for module in backbone.modules():
        stashed.append((module, module._forward_hooks))
        module._forward_hooks = OrderedDict()
    try:
        frozen = copy.deepcopy(backbone)
    finally:
        for module, hooks in stashed:
            module._forward_hooks = hooks
    frozen.requires_grad_(False)
    return frozen.eval()


def pooled_features(backbone: nn.Module, x: Tensor) -> Tensor:
    """Pooled features ``[B, F]`` as :class:`~lightning_stl.methods.FineTune` computes them."""
    return backbone.forward_head(backbone.forward_features(x), pre_logits=True)


def _zero_channel(channel: int, module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
    output = output.clone()
    output[:, channel] = 0
    return output


# ---------------------------------------------------------------------------- channel estimate
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


def _tensor_bytes(tensor: Tensor) -> bytes:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def _data_fingerprint(digest: Any, data: Any) -> None:
    """Add the training set's size, labels and images (pixels, or file names) to ``digest``."""
    labels = torch.as_tensor(data.labels)
    digest.update(f"n={len(labels)}".encode())
    digest.update(_tensor_bytes(labels.long()))
    images = getattr(data, "images", None)
    if isinstance(images, Tensor):
        digest.update(f"images{tuple(images.shape)}{images.dtype}".encode())
        digest.update(_tensor_bytes(images))
    files = getattr(data, "files", None)
    if files is not None:
        digest.update("\n".join(str(f) for f in np.asarray(files).tolist()).encode())


def _state_fingerprint(digest: Any, backbone: nn.Module) -> None:
    digest.update(type(backbone).__name__.encode())
    for key, value in sorted(backbone.state_dict().items()):
        digest.update(f"{key}{tuple(value.shape)}{value.dtype}".encode())
        digest.update(_tensor_bytes(value))


# ---------------------------------------------------------------------------- the regulariser
class DELTA(Regularizer):
    """DELTA's attention-weighted feature-map distance to the frozen pre-trained model, plus β/2
    times the squared norm of the new head (see the module docstring for the equation and forms).

    ``forward(step, module)`` runs the frozen model on ``step.inputs`` ``[B, C, H, W]`` (the
    images the student saw) under ``torch.no_grad``, takes the student's maps of the same
    layers from its last forward with gradients enabled, i.e. its forward in that step (forward
    hooks; maps are not kept under ``no_grad``/``inference_mode``), and returns the scalar
    α · :func:`attention_distance` + β/2 · ‖head‖².

    Args:
        alpha: α ≥ 0 of the feature-map term. Default 0.01, the DELTA paper's and code's
            (``train.py --alpha 0.01``; 0.1 for Stanford Dogs in its ``run.sh``). SMILE's code
            uses 0.001 (FGVC-Aircraft, Stanford Cars) and 0.01 (CUB-200).
        beta: β ≥ 0 of the head's weight decay. Default 0.01 (the paper's and code's).
        layers: Names of backbone modules (``named_modules()``) whose outputs ``[B, C, h, w]``
            are the feature maps FM_j; ``None``: the modules of ``backbone.feature_info`` (the
            digits CNN: ``act1``, ``act2``, ``act3``; timm ResNets: ``act1``, ``layer1`` …
            ``layer4``). The authors' code uses the last ``conv3`` of each ResNet stage, e.g.
            ``[layer1.2.conv3, layer2.3.conv3, layer3.5.conv3, layer4.2.conv3]`` for ResNet-50.
        cache_dir: Folder of cached channel estimates, ``<cache_dir>/delta-<hash>.pt`` with the
            hash of (backbone class and state, layers, ``num_images``, number of classes, the
            estimate's settings, the training set's size, labels and images/file names). Every run
            with the same source model and training images reuses it. ``None``: estimate in every
            :meth:`setup`.
        num_images: Training images the loss increases are averaged over (drawn with a fixed
            seed; all of them if the set is smaller; ``None``: all). Default 128, the official
            code's 4 batches of 32. The classifier is always fitted on the whole training set.
        temperature: T > 0 of softmax(z / T). Default 5, the official code's.
        form: ``"paper"`` (default), ``"official"`` (DELTA's code) or ``"smile_official"``
            (SMILE's code), see the module docstring.
        device: Where the channel estimate runs (e.g. ``"cuda"``); ``None``: where the backbone
            is at :meth:`setup` (before the trainer moves it: usually the CPU).

    The channel weights are non-persistent buffers ``channel_weight_<j>`` (they move with
    ``.to``, they are not in ``state_dict``): :meth:`setup` always runs again before a checkpoint
    is loaded, and then reads the cache. With DELTA the paper trains without ordinary weight
    decay (``optimizer.weight_decay=0``); the ``method=delta`` config cannot set it.
    """

    name = "delta"

    def __init__(
        self,
        alpha: float = 0.01,
        beta: float = 0.01,
        layers: Sequence[str] | None = None,
        cache_dir: str | os.PathLike | None = None,
        num_images: int | None = 128,
        temperature: float = 5.0,
        form: str = "paper",
        device: str | None = None,
    ):
        super().__init__()
        self.alpha = check_loss_weight("DELTA alpha (α)", alpha)
        self.beta = check_loss_weight("DELTA beta (β)", beta)
        if layers is not None:
            if isinstance(layers, str) or not all(isinstance(n, str) for n in layers):
                raise ValueError(
                    f"DELTA layers={layers!r} is not allowed: give a list of module names "
                    "(e.g. [layer1, layer2]) or null for backbone.feature_info"
                )
            if not layers:
                raise ValueError("DELTA layers=[] is not allowed: name at least one module")
            duplicates = sorted({n for n in layers if list(layers).count(n) > 1})
            if duplicates:
                raise ValueError(f"DELTA layers: {duplicates} appear more than once")
            layers = list(layers)
        self.layers = layers
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if num_images is not None and (
            isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1
        ):
            raise ValueError(
                f"DELTA num_images={num_images!r} is not allowed: it must be an integer >= 1 "
                "or null (all training images)"
            )
        self.num_images = num_images
        if isinstance(temperature, bool) or not isinstance(temperature, int | float):
            raise ValueError(f"DELTA temperature={temperature!r} is not allowed: it must be > 0")
        if not (temperature > 0 and np.isfinite(temperature)):
            raise ValueError(f"DELTA temperature={temperature!r} is not allowed: it must be > 0")
        self.temperature = float(temperature)
        self.form = _check_form(form)
        if self.form == "smile_official" and (self.beta > 0 or self.layers != ["layer4"]):
            _logger.warning(
                "DELTA form=smile_official with beta=%s and layers=%s: SMILE's code uses it with "
                "beta=0 and layers=[layer4] (ResNet-50's last stage) only",
                self.beta,
                self.layers,
            )
        self.device = torch.device(device) if device is not None else None
        self.layer_names: list[str] = []
        # Not sub-modules: a list keeps the frozen model out of state_dict, .to and parameters().
        self._frozen: list[nn.Module] = []
        self._handles: list[RemovableHandle] = []
        self._student_maps: dict[str, Tensor] = {}
        self._frozen_maps: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ set-up
    def setup(self, module: FineTune, datamodule: Any) -> None:
        """Freeze a copy of ``module.backbone`` (the loaded source model), hook the layers, and
        estimate (or read from the cache) the channel weights on the target training set."""
        if datamodule is None:
            raise ValueError(
                "DELTA estimates its channel weights on the target training set: setup needs the "
                "DataModule, got None"
            )
        self.attach(module.backbone)
        num_classes = int(module.head.out_features)
        increases = self._cached_loss_increases(datamodule, num_classes)
        weights = channel_attention(increases, self.temperature)
        self.set_channel_weights([w.to(module.head.weight.device) for w in weights])

    def attach(self, backbone: nn.Module) -> None:
        """Take the frozen copy of ``backbone`` and hook the layers on both (no channel weights:
        :meth:`setup` estimates them, or give them to :meth:`set_channel_weights`)."""
        self.detach()
        names = resolve_layers(backbone, self.layers)
        frozen = frozen_copy(backbone)
        student_modules, frozen_modules = (
            dict(backbone.named_modules()),
            dict(frozen.named_modules()),
        )
        for name in names:
            hook = functools.partial(self._capture_student, name)
            self._handles.append(student_modules[name].register_forward_hook(hook))
            hook = functools.partial(self._capture_frozen, name)
            self._handles.append(frozen_modules[name].register_forward_hook(hook))
        self._frozen = [frozen]
        self.layer_names = names

    def detach(self) -> None:
        """Remove the hooks and drop the frozen model and captured maps."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._frozen, self.layer_names = [], [], []
        self._student_maps.clear()
        self._frozen_maps.clear()

    def _capture_student(self, name: str, module: nn.Module, inputs: Any, output: Any) -> None:
        if torch.is_grad_enabled():  # training steps; not validation, test or the teacher
            self._student_maps[name] = output

    def _capture_frozen(self, name: str, module: nn.Module, inputs: Any, output: Any) -> None:
        self._frozen_maps[name] = output

    @property
    def frozen(self) -> nn.Module:
        """The frozen pre-trained backbone w⁰ (after :meth:`setup`)."""
        if not self._frozen:
            raise RuntimeError("DELTA has no frozen model: call setup(module, datamodule) first")
        return self._frozen[0]

    def set_channel_weights(self, weights: Sequence[Tensor]) -> None:
        """The channel weights W_j ``[C_j]``, one distribution per layer (non-negative, sum 1)."""
        if self.layer_names and len(weights) != len(self.layer_names):
            raise ValueError(
                f"DELTA has {len(self.layer_names)} layers ({', '.join(self.layer_names)}) but "
                f"got {len(weights)} channel weights"
            )
        checked = []
        for j, weight in enumerate(weights):
            weight = torch.as_tensor(weight).detach().float()
            total = float(weight.sum()) if weight.numel() else 0.0
            if weight.ndim != 1 or not torch.isfinite(weight).all() or (weight < 0).any():
                raise ValueError(
                    f"DELTA channel weights of layer {j} must be a finite, non-negative vector "
                    f"[C], got shape {tuple(weight.shape)}"
                )
            if abs(total - 1.0) > 1e-4:
                raise ValueError(
                    f"DELTA channel weights of layer {j} must sum to 1 (a distribution over its "
                    f"channels), they sum to {total:.6g}"
                )
            checked.append(weight)
        for key in [k for k in self._buffers if k.startswith(_WEIGHT)]:
            del self._buffers[key]
        for j, weight in enumerate(checked):
            self.register_buffer(f"{_WEIGHT}{j}", weight, persistent=False)

    def channel_weights(self) -> list[Tensor]:
        """W_j ``[C_j]`` per layer (empty before :meth:`setup`)."""
        count = sum(1 for k in self._buffers if k.startswith(_WEIGHT))
        return [self._buffers[f"{_WEIGHT}{j}"] for j in range(count)]

    # ------------------------------------------------------------------ channel estimate
    def cache_path(self, datamodule: Any, num_classes: int) -> Path | None:
        """``<cache_dir>/delta-<hash>.pt`` of this backbone, these settings and training set."""
        if self.cache_dir is None:
            return None
        digest = hashlib.sha256(f"delta-v{CACHE_VERSION}".encode())
        settings = (
            self.layer_names,
            self.num_images,
            num_classes,
            PROBE_WEIGHT_DECAY,
            PROBE_MAX_ITER,
            SUBSET_SEED,
        )
        digest.update(repr(settings).encode())
        # file-based sets are decoded through the evaluation transform, which these decide
        transform = tuple(
            getattr(datamodule, name, None) for name in ("resize_size", "crop_size", "keep_aspect")
        )
        digest.update(f"transform{transform!r}".encode())
        _state_fingerprint(digest, self.frozen)
        _data_fingerprint(digest, _target_train_set(datamodule))
        return self.cache_dir / f"delta-{digest.hexdigest()[:32]}.pt"

    def _cached_loss_increases(self, datamodule: Any, num_classes: int) -> list[Tensor]:
        path = self.cache_path(datamodule, num_classes)
        if path is not None and path.is_file():
            stored = torch.load(path, map_location="cpu", weights_only=True)
            if stored.get("layers") == self.layer_names:
                _logger.info("DELTA channel weights read from %s", path)
                return list(stored["loss_increases"])
            _logger.warning("DELTA cache %s is for other layers; estimating again", path)
        with torch.random.fork_rng(devices=[]):  # the data loader draws seeds: keep the run's RNG
            increases = self.estimate_loss_increases(datamodule, num_classes)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            torch.save({"layers": self.layer_names, "loss_increases": increases}, partial)
            os.replace(partial, path)  # atomic: parallel runs never read half a file
            _logger.info("DELTA channel weights cached in %s", path)
        return increases

    def estimate_loss_increases(self, datamodule: Any, num_classes: int) -> list[Tensor]:
        """ΔL ``[C_j]`` per layer on the target training set: the classifier is fitted on the
        frozen model's pooled features of every training image, the increases are measured on
        ``num_images`` of them (see :func:`fit_probe`, :func:`channel_loss_increases`)."""
        from lightning.fabric.utilities.apply_func import move_data_to_device

        from lightning_stl.interpolation import split_loader

        frozen = self.frozen.eval()
        device = self.device or _param_device(frozen)
        frozen.to(device)
        data = _target_train_set(datamodule)
        size = len(data)
        if size == 0:
            raise ValueError("DELTA needs target training images, the training set is empty")
        count = size if self.num_images is None else min(self.num_images, size)
        generator = torch.Generator().manual_seed(SUBSET_SEED)
        chosen = torch.zeros(size, dtype=torch.bool)
        chosen[torch.randperm(size, generator=generator)[:count]] = True
        features, labels, images, image_labels = [], [], [], []
        offset = 0
        with torch.no_grad():
            for batch in split_loader(datamodule, "train"):
                x, y = datamodule.on_after_batch_transfer(move_data_to_device(batch, device), 0)
                features.append(pooled_features(frozen, x).float())
                labels.append(y)
                keep = chosen[offset : offset + len(y)].to(device)
                images.append(x[keep])
                image_labels.append(y[keep])
                offset += len(y)
        self._frozen_maps.clear()
        targets = torch.cat(labels)
        if int(targets.min()) < 0 or int(targets.max()) >= num_classes:
            raise ValueError(
                f"DELTA: training labels lie in [{int(targets.min())}, {int(targets.max())}], "
                f"but the target head has {num_classes} classes"
            )
        probe = fit_probe(torch.cat(features), targets, num_classes)
        _logger.info(
            "DELTA: estimating %d layers' channel weights on %d images",
            len(self.layer_names),
            count,
        )
        increases = channel_loss_increases(
            frozen, probe, self.layer_names, torch.cat(images), torch.cat(image_labels)
        )
        self._frozen_maps.clear()
        return increases

    # ------------------------------------------------------------------ the penalty
    def frozen_maps(self, inputs: Tensor) -> list[Tensor]:
        """FM_j(w⁰, x) ``[B, C_j, h_j, w_j]`` of the frozen model on ``inputs``, without grad."""
        frozen = self.frozen
        if _param_device(frozen) != inputs.device:
            frozen.to(inputs.device)
        frozen.eval()
        self._frozen_maps.clear()
        with torch.no_grad():
            pooled_features(frozen, inputs)
        maps = self._collect(self._frozen_maps, "frozen model")
        self._frozen_maps.clear()
        return maps

    def _collect(self, store: dict[str, Tensor], owner: str) -> list[Tensor]:
        missing = [name for name in self.layer_names if name not in store]
        if missing:
            raise RuntimeError(
                f"DELTA got no output of layer(s) {', '.join(missing)} from the {owner}'s forward "
                "in this step (the student's maps are kept only while gradients are enabled; the "
                "layers must be used by forward_features/forward_head)"
            )
        return [store[name] for name in self.layer_names]

    def forward(self, step: FineTuneStep, module: FineTune) -> Tensor:
        weights = self.channel_weights()
        if not weights:
            raise RuntimeError("DELTA has no channel weights: call setup(module, datamodule) first")
        student = self._collect(self._student_maps, "student")
        self._student_maps.clear()
        batch = step.inputs.shape[0]
        if any(m.shape[0] != batch for m in student):
            raise RuntimeError(
                f"DELTA: the student's maps have batch sizes {[m.shape[0] for m in student]}, the "
                f"step's inputs {batch}: the maps are not from this step's forward"
            )
        distance = attention_distance(student, self.frozen_maps(step.inputs), weights, self.form)
        return self.alpha * distance + 0.5 * self.beta * head_penalty(module.head)

    def extra_repr(self) -> str:
        layers = self.layer_names or self.layers
        return (
            f"alpha={self.alpha}, beta={self.beta}, layers={layers}, form={self.form!r}, "
            f"temperature={self.temperature}, num_images={self.num_images}"
        )


def _check_form(form: str) -> str:
    if form not in FORMS:
        raise ValueError(f"DELTA form={form!r} is not allowed: choose one of {', '.join(FORMS)}")
    return form


def _param_device(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    if param is None:
        param = next(module.buffers(), None)
    return param.device if param is not None else torch.device("cpu")


def _target_train_set(datamodule: Any) -> Any:
    """The set-up target training set of the DataModule (``setup`` is called when needed)."""
    from lightning_stl.schedule import TARGET

    train_sets = getattr(datamodule, "train_sets", None)
    if train_sets is None:
        raise ValueError(
            "DELTA needs a SourceTargetDataModule (with train_sets), got "
            f"{type(datamodule).__name__}"
        )
    if TARGET not in train_sets:
        datamodule.setup("fit")
    return datamodule.train_sets[TARGET]
