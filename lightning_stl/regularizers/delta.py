"""DELTA: feature-map regularisation with channel attention (Li, Xiong, Wang et al., ICLR 2019).

"DELTA: DEep Learning Transfer using Feature Map with Attention for Convolutional Networks",
the attention-weighted behavioural regulariser Ω: the student w is kept close to the pre-trained
model w⁰ *in behaviour*, through the outer feature maps FM_j ``[B, C_j, h_j, w_j]`` of chosen
layers on the same images x ``[B, C, H, W]``, each channel c weighted by how much the pre-trained
model needs it for the target task:

    Ω(w) = α · Σ_j Σ_c W_{j,c} · ‖FM_{j,c}(w, x) − FM_{j,c}(w⁰, x)‖²₂  +  β/2 · ‖w_S̄‖²₂

with w_S̄ the new target head (:func:`~lightning_stl.regularizers.l2sp.head_penalty`).

The channel weights W_{j,·} (the paper's "supervised attention") are estimated on the target
training set by :mod:`lightning_stl.regularizers.delta_channels`.

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
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_stl.checks import choice, integer, number
from lightning_stl.regularizers.base import FineTuneSetup, FineTuneStep, Regularizer
from lightning_stl.regularizers.delta_channels import (
    cache_file,
    cached_loss_increases,
    channel_attention,
    estimate_loss_increases,
    pooled_features,
)
from lightning_stl.regularizers.l2sp import head_penalty
from lightning_stl.regularizers.layer_lookup import resolve_layers

_logger = logging.getLogger(__name__)

FORMS = ("paper", "official", "smile_official")
_WEIGHT = "channel_weight_"


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
    choice("DELTA form", form, FORMS)
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


class DELTA(Regularizer):
    """DELTA's attention-weighted feature-map distance to the frozen pre-trained model, plus β/2
    times the squared norm of the new head (see the module docstring for the equation and forms).

    ``forward(step)`` runs the frozen pre-trained backbone (the set-up's ``pretrained``) on ``step.inputs`` ``[B, C, H, W]`` (the
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
        device: Where the channel estimate runs (e.g. ``"cuda"``); ``None``: where the
            pre-trained backbone is at :meth:`setup` (the run's device: the model is moved there
            before its regularisers are set up); the snapshot goes back there afterwards.

    The channel weights are non-persistent buffers ``channel_weight_<j>`` (they move with
    ``.to``, they are not in ``state_dict``): :meth:`setup` always runs again before a checkpoint
    is loaded, and then reads the cache. With DELTA the paper trains without ordinary weight
    decay (``optimizer.weight_decay=0``); the ``method=delta`` config cannot set it.
    """

    name = "delta"
    uses_pretrained = True

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
        self.alpha = number("DELTA alpha (α)", alpha, at_least=0)
        self.beta = number("DELTA beta (β)", beta, at_least=0)
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
        self.num_images = integer(
            "DELTA num_images", num_images, 1, null=True, also="null (all training images)"
        )
        self.temperature = number("DELTA temperature", temperature, above=0)
        self.form = choice("DELTA form", form, FORMS)
        if self.form == "smile_official" and (self.beta > 0 or self.layers != ["layer4"]):
            _logger.warning(
                "DELTA form=smile_official with beta=%s and layers=%s: SMILE's code uses it with "
                "beta=0 and layers=[layer4] (ResNet-50's last stage) only",
                self.beta,
                self.layers,
            )
        self.device = torch.device(device) if device is not None else None
        self.layer_names: list[str] = []
        self._handles: list[RemovableHandle] = []
        self._student_maps: dict[str, Tensor] = {}
        self._frozen_maps: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ set-up
    def setup(self, setup: FineTuneSetup) -> None:
        """:meth:`bind` to the set-up's backbones, then estimate (or read from the cache) the
        channel weights on its target training images."""
        if setup.target_images is None:
            raise ValueError(
                "DELTA estimates its channel weights on the target training set: the set-up has "
                "no target_images"
            )
        self.bind(setup)
        layers, pretrained = self.layer_names, self.require_pretrained()
        path = None
        if self.cache_dir is not None:
            path = cache_file(
                self.cache_dir,
                pretrained,
                layers,
                self.num_images,
                setup.num_target_classes,
                setup.data_key(),
            )
        increases = cached_loss_increases(
            path,
            layers,
            lambda: estimate_loss_increases(
                pretrained,
                layers,
                setup.target_images,
                setup.num_target_images,
                setup.num_target_classes,
                self.num_images,
                self.device,
            ),
        )
        self._frozen_maps.clear()
        weights = channel_attention(increases, self.temperature)
        self.set_channel_weights([w.to(setup.head.weight.device) for w in weights])

    def bind(self, setup: FineTuneSetup) -> None:
        """Keep ``setup`` and hook the layers of its ``backbone`` and ``pretrained`` (no channel
        weights: :meth:`setup` estimates them, or give them to :meth:`set_channel_weights`)."""
        self.detach()
        names = resolve_layers(setup.backbone, self.layers)
        student_modules = dict(setup.backbone.named_modules())
        Regularizer.setup(self, setup)
        frozen_modules = dict(self.require_pretrained().named_modules())
        for name in names:
            hook = functools.partial(self._capture_student, name)
            self._handles.append(student_modules[name].register_forward_hook(hook))
            hook = functools.partial(self._capture_frozen, name)
            self._handles.append(frozen_modules[name].register_forward_hook(hook))
        self.layer_names = names

    def detach(self) -> None:
        """Remove the hooks and drop the set-up and the captured maps."""
        for handle in self._handles:
            handle.remove()
        self._handles, self.layer_names, self.context = [], [], None
        self._student_maps.clear()
        self._frozen_maps.clear()

    def _capture_student(self, name: str, module: nn.Module, inputs: Any, output: Any) -> None:
        if torch.is_grad_enabled():  # training steps; not validation, test or the teacher
            self._student_maps[name] = output

    def _capture_frozen(self, name: str, module: nn.Module, inputs: Any, output: Any) -> None:
        self._frozen_maps[name] = output

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
        for key in [k for k, _ in self.named_buffers(recurse=False) if k.startswith(_WEIGHT)]:
            delattr(self, key)
        for j, weight in enumerate(checked):
            self.register_buffer(f"{_WEIGHT}{j}", weight, persistent=False)

    def channel_weights(self) -> list[Tensor]:
        """W_j ``[C_j]`` per layer (empty before :meth:`setup`)."""
        count = sum(1 for k, _ in self.named_buffers(recurse=False) if k.startswith(_WEIGHT))
        return [self.get_buffer(f"{_WEIGHT}{j}") for j in range(count)]

    # ------------------------------------------------------------------ the penalty
    def frozen_maps(self, inputs: Tensor) -> list[Tensor]:
        """FM_j(w⁰, x) ``[B, C_j, h_j, w_j]`` of the frozen model on ``inputs``, without grad."""
        frozen = self.require_pretrained()
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

    def forward(self, step: FineTuneStep) -> Tensor:
        head = self.require_setup().head
        weights = self.channel_weights()
        if not weights:
            raise RuntimeError("DELTA has no channel weights: call setup(FineTuneSetup) first")
        student = self._collect(self._student_maps, "student")
        self._student_maps.clear()
        batch = step.inputs.shape[0]
        if any(m.shape[0] != batch for m in student):
            raise RuntimeError(
                f"DELTA: the student's maps have batch sizes {[m.shape[0] for m in student]}, the "
                f"step's inputs {batch}: the maps are not from this step's forward"
            )
        distance = attention_distance(student, self.frozen_maps(step.inputs), weights, self.form)
        return self.alpha * distance + 0.5 * self.beta * head_penalty(head)

    def extra_repr(self) -> str:
        layers = self.layer_names or self.layers
        return (
            f"alpha={self.alpha}, beta={self.beta}, layers={layers}, form={self.form!r}, "
            f"temperature={self.temperature}, num_images={self.num_images}"
        )
