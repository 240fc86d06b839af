"""Wide Residual Networks WRN-d-k for CIFAR and SVHN.

Zagoruyko, Komodakis, "Wide Residual Networks", BMVC 2016 (arXiv:1605.07146), following the
authors' code (github.com/szagoruyko/wide-residual-networks): a 3x3 convolution with 16 filters,
three stages of ``n = (d - 4) / 6`` pre-activation basic blocks with ``16k``, ``32k`` and ``64k``
filters (stride 2 at the first block of stages 2 and 3), a final BN-ReLU, global average pooling
and a linear classifier. A block is ``BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3`` plus a shortcut
that is the identity, or a 1x1 convolution of the pre-activated input where the shape changes.
Dropout (``drop_rate``, the paper uses 0.3 on CIFAR and 0.4 on SVHN) sits between the two
convolutions of every block; there is none before the classifier.

Initialisation as in the authors' code: convolutions (without biases) normal with standard
deviation ``sqrt(2 / (k * k * out_channels))`` (He et al. 2015, fan-out), zero classifier bias.
Batch-norm scales start at 1 (the Torch7 code drew them from U(0, 1), a framework default).

Shapes for a ``[B, C, H, W]`` input: ``forward_features`` gives ``[B, 64k, ceil(H/4), ceil(W/4)]``
(``[B, 64k, 8, 8]`` for 32x32), ``forward_head(..., pre_logits=True)`` ``[B, 64k]`` and
``forward`` ``[B, num_classes]`` (``[B, 64k]`` when ``num_classes=0``).

Parameters with 10 classes: WRN-10-2 0.30M, WRN-16-4 2.75M, WRN-28-10 36.48M (the paper's 2.7M
and 36.5M).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

from lightning_stl.models.backbone import TimmBackbone, build_variant, cifar_cfg
from lightning_stl.models.registry import register_backbone

__all__ = ["WideBasicBlock", "WideResNet", "wide_resnet"]


#: the paper of these models, as fields of timm's pretrained config
PAPER = dict(
    paper_ids="arXiv:1605.07146",
    paper_name="Wide Residual Networks",
    description="Wide ResNet (Zagoruyko & Komodakis 2016), random initialisation",
)

# read by timm.models.register_model: the pretrained config of each registered name (no weights)
default_cfgs = {name: cifar_cfg(**PAPER) for name in ("wrn10_2", "wrn16_4", "wrn28_10")}


class WideBasicBlock(nn.Module):
    """Pre-activation wide basic block with dropout between its two convolutions.

    ``o = relu(bn1(x)); y = conv2(dropout(relu(bn2(conv1(o))))); return y + shortcut``, where the
    shortcut is ``x`` if the shape is kept and ``convdim(o)`` (1x1, stride ``stride``) otherwise.
    ``[B, in_planes, H, W] -> [B, planes, ceil(H/stride), ceil(W/stride)]``.
    """

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        drop_rate: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.bn1 = nn.BatchNorm2d(in_planes, **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(planes, **dd)
        self.act2 = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(drop_rate)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False, **dd)
        self.convdim: nn.Conv2d | None = None
        if stride != 1 or in_planes != planes:
            self.convdim = nn.Conv2d(in_planes, planes, 1, stride, 0, bias=False, **dd)

    def forward(self, x: Tensor) -> Tensor:
        o = self.act1(self.bn1(x))
        shortcut = x if self.convdim is None else self.convdim(o)
        y = self.conv1(o)
        y = self.drop(self.act2(self.bn2(y)))
        return self.conv2(y) + shortcut


class WideResNet(TimmBackbone):
    """WRN-``depth``-``widen_factor`` with timm's model interface (Zagoruyko & Komodakis 2016).

    Args:
        depth: ``6n+4`` (10, 16, 22, 28, 40, ...): ``n`` blocks per stage.
        widen_factor: ``k``; stage widths ``16k``, ``32k``, ``64k``.
        num_classes: Classifier outputs; 0 for none (``forward`` returns pooled features).
        in_chans: Input channels ``C`` of ``[B, C, H, W]``.
        drop_rate: Dropout between the two convolutions of each block (train mode only).
        global_pool: timm pooling type (``"avg"``, ``"max"``, ``"avgmax"``, ``""`` for none).
        device, dtype: Factory arguments for the parameters.
        **kwargs: Only switched-off generic options (``drop_path_rate=0``) are accepted.
    """

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes, in_chans, drop_rate, kwargs)
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth must be 6n+4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be >= 1, got {widen_factor}")
        dd = {"device": device, "dtype": dtype}
        blocks = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.depth = depth
        self.widen_factor = widen_factor
        self.blocks_per_stage = blocks

        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False, **dd)
        in_planes = widths[0]
        stages = []
        for i, planes in enumerate(widths[1:]):
            stride = 1 if i == 0 else 2
            layers = []
            for j in range(blocks):
                layers.append(
                    WideBasicBlock(in_planes, planes, stride if j == 0 else 1, drop_rate, **dd)
                )
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.norm = nn.BatchNorm2d(widths[-1], **dd)
        self.act = nn.ReLU(inplace=True)

        self.feature_info = [
            {"num_chs": widths[0], "reduction": 1, "module": "conv1"},
            {"num_chs": widths[1], "reduction": 1, "module": "layer1"},
            {"num_chs": widths[2], "reduction": 2, "module": "layer2"},
            {"num_chs": widths[3], "reduction": 4, "module": "act"},
        ]
        # no dropout before the classifier: WRN's dropout is inside the blocks
        self.init_head(widths[-1], global_pool, None, **dd)

    def forward_features(self, x: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, 64k, ceil(H/4), ceil(W/4)]`` (after the final BN-ReLU)."""
        x = self.conv1(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.act(self.norm(x))


def wide_resnet(
    depth: int, widen_factor: int, pretrained: bool = False, **kwargs: Any
) -> WideResNet:
    """Build WRN-``depth``-``widen_factor`` through timm's builder.

    Registered variants use their entry in ``default_cfgs``, others the same config under the name
    ``wrn{depth}_{widen_factor}``. ``kwargs`` go to :class:`WideResNet` (e.g. ``drop_rate=0.3``) or
    to :func:`timm.models.build_model_with_cfg` (``pretrained_cfg``, ``features_only``, ...).
    """
    return build_variant(
        WideResNet,
        f"wrn{depth}_{widen_factor}",
        pretrained,
        default_cfgs,
        functools.partial(cifar_cfg, **PAPER),
        (0, 1, 2, 3),
        depth=depth,
        widen_factor=widen_factor,
        **kwargs,
    )


@register_backbone
def wrn10_2(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-10-2: one block per stage, widths 16, 32, 64, 128."""
    return wide_resnet(10, 2, pretrained, **kwargs)


@register_backbone
def wrn16_4(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-16-4: two blocks per stage, widths 16, 64, 128, 256 (2.7M parameters)."""
    return wide_resnet(16, 4, pretrained, **kwargs)


@register_backbone
def wrn28_10(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-28-10: four blocks per stage, widths 16, 160, 320, 640 (36.5M parameters)."""
    return wide_resnet(28, 10, pretrained, **kwargs)
