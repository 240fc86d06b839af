"""timm's model interface, shared by this project's backbones.

timm's models answer to the same attributes and methods whatever their architecture:
``num_classes``, ``num_features``/``head_hidden_size`` (the pooled width ``F``), ``feature_info``
(for ``features_only``), ``forward_features`` (``[B, C, H, W] -> [B, F, h, w]``), ``forward_head``
(``[B, F, h, w] -> [B, num_classes]``, or ``[B, F]`` with ``pre_logits``), ``get_classifier`` and
``reset_classifier``, and they are built through :func:`timm.models.build_model_with_cfg` from a
pretrained config. :class:`TimmBackbone` holds that interface, so that each architecture
(:class:`~lightning_stl.models.resnet_cifar.CifarResNet`,
:class:`~lightning_stl.models.wide_resnet.WideResNet`,
:class:`~lightning_stl.models.digits_cnn.DigitsCNN`) holds only its layers and
``forward_features``::

    class Net(TimmBackbone):
        def __init__(self, num_classes=10, in_chans=3, drop_rate=0.0, global_pool="avg",
                     device=None, dtype=None, **kwargs):
            super().__init__(num_classes, in_chans, drop_rate, kwargs)
            self.conv1 = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False, device=device, dtype=dtype)
            ...  # the layers, then feature_info
            self.feature_info = [{"num_chs": 64, "reduction": 1, "module": "conv1"}, ...]
            self.init_head(64, global_pool, drop_rate, device=device, dtype=dtype)  # last

        def forward_features(self, x): ...

:meth:`TimmBackbone.init_head` comes last in ``__init__``: it adds the pooling, the classifier
``fc`` and the head dropout after the layers (their order in ``state_dict``) and then initialises
the whole model with :func:`init_weights`, so that a seeded build draws its random numbers in
the order of the layers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from timm.layers import create_classifier
from timm.models import build_model_with_cfg
from torch import Tensor, nn

from lightning_stl.models.registry import check_unused_kwargs

__all__ = ["TimmBackbone", "backbone_cfg", "build_variant", "cifar_cfg", "init_weights"]

#: Channel statistics of CIFAR-10's training images, the normalisation of the CIFAR configs.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def backbone_cfg(**fields: Any) -> dict[str, Any]:
    """A pretrained config (``default_cfgs`` entry) of this project's backbones: no weights URL,
    10 classes, no centre crop, first convolution ``conv1`` and classifier ``fc``; ``fields``
    add to or override these."""
    return {
        "url": "",
        "num_classes": 10,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "first_conv": "conv1",
        "classifier": "fc",
        **fields,
    }


def cifar_cfg(**fields: Any) -> dict[str, Any]:
    """:func:`backbone_cfg` for 32x32 RGB images normalised with CIFAR-10's statistics and an 8x8
    last feature map."""
    return backbone_cfg(
        input_size=(3, 32, 32),
        pool_size=(8, 8),
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        **fields,
    )


def build_variant(
    model_cls: type[nn.Module],
    variant: str,
    pretrained: bool,
    default_cfgs: Mapping[str, Any],
    make_cfg: Callable[..., dict[str, Any]],
    out_indices: tuple[int, ...],
    **kwargs: Any,
) -> nn.Module:
    """Build ``variant`` through :func:`timm.models.build_model_with_cfg`.

    A registered variant (one in ``default_cfgs``) uses its config; another one gets
    ``make_cfg(architecture=variant)`` unless ``kwargs`` give a ``pretrained_cfg``.
    ``out_indices`` are the ``feature_info`` levels that ``features_only`` returns.
    """
    if kwargs.get("pretrained_cfg") is None and variant not in default_cfgs:
        kwargs["pretrained_cfg"] = make_cfg(architecture=variant)
    return build_model_with_cfg(
        model_cls, variant, pretrained, feature_cfg={"out_indices": out_indices}, **kwargs
    )


def init_weights(module: nn.Module) -> None:
    """He et al. 2015 (fan-out) normal convolutions, unit BN scale, zero BN shift and zero
    classifier bias; the classifier weight keeps PyTorch's default initialisation."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class TimmBackbone(nn.Module):
    """timm's model interface for a CNN: a feature map, global pooling, optional dropout, ``fc``.

    A subclass calls ``super().__init__(num_classes, in_chans, drop_rate, kwargs)`` first, builds
    its layers and ``feature_info``, calls :meth:`init_head` last and implements
    :meth:`forward_features`.

    Args:
        num_classes: Classifier outputs; 0 for none (``forward`` returns pooled features).
        in_chans: Input channels ``C`` of ``[B, C, H, W]``.
        drop_rate: The model's dropout rate, in [0, 1); where it acts is the subclass's choice.
        unused_kwargs: The constructor's remaining keyword arguments: only switched-off generic
            options (``drop_path_rate=0``) are accepted, anything else raises ``TypeError``.
    """

    num_features: int
    head_hidden_size: int
    feature_info: list[dict[str, Any]]
    global_pool: nn.Module
    fc: nn.Module
    head_drop: nn.Module | None

    def __init__(
        self,
        num_classes: int,
        in_chans: int,
        drop_rate: float,
        unused_kwargs: Mapping[str, Any],
    ) -> None:
        super().__init__()
        check_unused_kwargs(unused_kwargs, type(self).__name__)
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must lie in [0, 1), got {drop_rate}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate

    def init_head(
        self,
        num_features: int,
        global_pool: str,
        head_drop_rate: float | None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Add pooling (timm type ``global_pool``: ``"avg"``, ``"max"``, ``"avgmax"``, ``""``),
        the classifier ``fc`` and, unless ``head_drop_rate`` is ``None``, dropout on the pooled
        features; then initialise every layer of the model with :func:`init_weights`."""
        self.num_features = self.head_hidden_size = num_features
        self.global_pool, self.fc = create_classifier(
            num_features, self.num_classes, pool_type=global_pool, device=device, dtype=dtype
        )
        self.head_drop = None if head_drop_rate is None else nn.Dropout(head_drop_rate)
        self.apply(init_weights)

    def get_classifier(self) -> nn.Module:
        """The final linear layer (``nn.Identity`` when ``num_classes == 0``)."""
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier by a freshly initialised one with ``num_classes`` outputs."""
        ref = next(self.parameters())
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.fc = create_classifier(
            self.num_features,
            num_classes,
            pool_type=global_pool,
            device=ref.device,
            dtype=ref.dtype,
        )
        self.fc.apply(init_weights)
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def forward_features(self, x: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, num_features, h, w]``, the unpooled last feature map."""
        raise NotImplementedError

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool, dropout (if the model has head dropout), classify:
        ``[B, num_features, h, w] -> [B, num_classes]`` (``[B, num_features]`` if ``pre_logits``
        or ``num_classes == 0``)."""
        x = self.global_pool(x)
        if self.head_drop is not None:
            x = self.head_drop(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, num_classes]`` (pooled features ``[B, num_features]`` if no
        classifier)."""
        return self.forward_head(self.forward_features(x))
