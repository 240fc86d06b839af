"""CIFAR ResNets of depth 6n+2 (ResNet-20/32/44/56/110).

He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016, Sec. 4.2
(arXiv:1512.03385): a 3x3 convolution with 16 filters, then three stages of ``n`` basic blocks
(two 3x3 convolutions each) with 16, 32 and 64 filters on 32x32, 16x16 and 8x8 maps (the first
convolution of stages 2 and 3 has stride 2), global average pooling and a linear classifier;
6n+2 weighted layers in all. Where the shape changes, the shortcut is either

* option A: the identity on every second pixel, zero-padded with the extra channels
  (parameter-free; the paper's CIFAR models, ResNet-20 has 0.27M parameters), or
* option B: a 1x1 convolution with stride 2 followed by batch norm (a projection; the default
  here, 2,752 more parameters for every depth).

Shapes for a ``[B, C, H, W]`` input: ``forward_features`` gives ``[B, 64, ceil(H/4), ceil(W/4)]``
(``[B, 64, 8, 8]`` for 32x32, ``[B, 64, 2, 2]`` for 8x8), ``forward_head(..., pre_logits=True)``
``[B, 64]`` and ``forward`` ``[B, num_classes]`` (``[B, 64]`` when ``num_classes=0``).
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_stl.models.backbone import TimmBackbone, build_variant, cifar_cfg
from lightning_stl.models.registry import register_backbone

__all__ = ["BasicBlock", "CifarResNet", "ZeroPadShortcut", "resnet_cifar"]

Shortcut = Literal["A", "B"]


#: the paper of these models, as fields of timm's pretrained config
PAPER = dict(
    paper_ids="arXiv:1512.03385",
    paper_name="Deep Residual Learning for Image Recognition",
    description="CIFAR ResNet (He et al. 2016, Sec. 4.2), random initialisation",
)

# read by timm.models.register_model: the pretrained config of each registered name (no weights)
default_cfgs = {name: cifar_cfg(**PAPER) for name in ("resnet20", "resnet32", "resnet56")}


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: ``[B, C_in, H, W] -> [B, C_out, ceil(H/s), ceil(W/s)]`` without weights.

    Subsamples by taking every ``stride``-th pixel and pads the channel dimension with zeros,
    ``(C_out - C_in) // 2`` channels before and the rest after the input channels.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        if out_planes < in_planes:
            raise ValueError(f"option A cannot reduce channels ({in_planes} -> {out_planes})")
        self.stride = stride
        self.pad_before = (out_planes - in_planes) // 2
        self.pad_after = out_planes - in_planes - self.pad_before

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))


class BasicBlock(nn.Module):
    """Post-activation basic block: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``.

    ``[B, in_planes, H, W] -> [B, planes, ceil(H/stride), ceil(W/stride)]``.
    """

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        shortcut: Shortcut = "B",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(planes, **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(planes, **dd)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.downsample = ZeroPadShortcut(in_planes, planes, stride)
            else:
                self.downsample = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride, bias=False, **dd),
                    nn.BatchNorm2d(planes, **dd),
                )

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act2(x + shortcut)


class CifarResNet(TimmBackbone):
    """CIFAR ResNet of depth ``6n+2`` with timm's model interface (He et al. 2016, Sec. 4.2).

    Args:
        depth: Weighted layers, ``6n+2`` (20, 32, 44, 56, 110, ...): ``n`` blocks per stage.
        num_classes: Classifier outputs; 0 for none (``forward`` returns pooled features).
        in_chans: Input channels ``C`` of ``[B, C, H, W]``.
        drop_rate: Dropout on the pooled features before the classifier (train mode only).
        shortcut: ``"A"`` (zero-padding identity) or ``"B"`` (1x1 conv + BN projection).
        global_pool: timm pooling type (``"avg"``, ``"max"``, ``"avgmax"``, ``""`` for none).
        widths: Channels of the three stages (the paper's 16, 32, 64).
        device, dtype: Factory arguments for the parameters.
        **kwargs: Only switched-off generic options (``drop_path_rate=0``) are accepted.
    """

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        shortcut: Shortcut = "B",
        global_pool: str = "avg",
        widths: tuple[int, int, int] = (16, 32, 64),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes, in_chans, drop_rate, kwargs)
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (20, 32, 44, 56, ...), got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        dd = {"device": device, "dtype": dtype}
        blocks = (depth - 2) // 6
        self.depth = depth
        self.blocks_per_stage = blocks
        self.shortcut = shortcut

        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(widths[0], **dd)
        self.act1 = nn.ReLU(inplace=True)
        in_planes = widths[0]
        stages = []
        for i, planes in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers = []
            for j in range(blocks):
                layers.append(
                    BasicBlock(in_planes, planes, stride if j == 0 else 1, shortcut, **dd)
                )
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages

        self.feature_info = [
            {"num_chs": widths[0], "reduction": 1, "module": "act1"},
            {"num_chs": widths[0], "reduction": 1, "module": "layer1"},
            {"num_chs": widths[1], "reduction": 2, "module": "layer2"},
            {"num_chs": widths[2], "reduction": 4, "module": "layer3"},
        ]
        self.init_head(widths[-1], global_pool, drop_rate, **dd)

    def forward_features(self, x: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, 64, ceil(H/4), ceil(W/4)]`` (the unpooled last stage)."""
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        return self.layer3(x)


def resnet_cifar(depth: int, pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """Build the CIFAR ResNet of ``depth`` (6n+2) through timm's builder.

    Registered depths use their entry in ``default_cfgs``, others the same config under the name
    ``resnet{depth}``. ``kwargs`` go to :class:`CifarResNet` (e.g. ``shortcut="A"``) or to
    :func:`timm.models.build_model_with_cfg` (``pretrained_cfg``, ``pretrained_cfg_overlay``,
    ``features_only``, ...).
    """
    return build_variant(
        CifarResNet,
        f"resnet{depth}",
        pretrained,
        default_cfgs,
        functools.partial(cifar_cfg, **PAPER),
        (0, 1, 2, 3),
        depth=depth,
        **kwargs,
    )


@register_backbone
def resnet20(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-20 for 32x32 images (n=3; 0.27M parameters with option-A shortcuts)."""
    return resnet_cifar(20, pretrained, **kwargs)


@register_backbone
def resnet32(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-32 for 32x32 images (n=5; 0.46M parameters with option-A shortcuts)."""
    return resnet_cifar(32, pretrained, **kwargs)


@register_backbone
def resnet56(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-56 for 32x32 images (n=9; 0.85M parameters with option-A shortcuts)."""
    return resnet_cifar(56, pretrained, **kwargs)
