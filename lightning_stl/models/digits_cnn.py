"""A small CNN for 8x8 one-channel digit images (UCI optdigits / ``sklearn.datasets.load_digits``).

The images of the default source/target pair are 8x8, too small for the CIFAR networks' two
stride-2 stages. This network keeps the resolution for two 3x3 convolutions, halves it once and
ends with a third convolution and global average pooling, in the style of the VGG family
(Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
ICLR 2015, arXiv:1409.1556) with batch normalisation (Ioffe & Szegedy, ICML 2015,
arXiv:1502.03167) after every convolution::

    [B, C, 8, 8] -conv3x3(C->32)-BN-ReLU-> [B, 32, 8, 8]
                 -conv3x3(32->64)-BN-ReLU-> [B, 64, 8, 8]
                 -maxpool 2-> [B, 64, 4, 4]
                 -conv3x3(64->128)-BN-ReLU-> [B, 128, 4, 4]   (forward_features)
                 -global avg pool-> [B, 128] -dropout-> -linear-> [B, num_classes]

Any size of at least 2x2 works (``forward_features`` gives ``[B, 128, H // 2, W // 2]``).
94,186 parameters with 10 classes and one input channel (92,896 without classifier).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_stl.models.backbone import TimmBackbone, backbone_cfg, build_variant
from lightning_stl.models.registry import register_backbone

__all__ = ["DigitsCNN"]


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return backbone_cfg(
        input_size=(1, 8, 8),
        pool_size=(4, 4),
        # sklearn load_digits pixels / 16
        mean=(0.3053,),
        std=(0.3760,),
        description="small CNN for 8x8 optdigits images, random initialisation",
        **kwargs,
    )


# read by timm.models.register_model: the pretrained config of each registered name (no weights)
default_cfgs = {"digits_cnn": _cfg()}


class DigitsCNN(TimmBackbone):
    """Three-convolution CNN for 8x8 digits with timm's model interface.

    Args:
        num_classes: Classifier outputs; 0 for none (``forward`` returns pooled features).
        in_chans: Input channels ``C`` of ``[B, C, H, W]``.
        drop_rate: Dropout on the pooled features before the classifier (train mode only).
        widths: Channels of the three convolutions (32, 64, 128).
        global_pool: timm pooling type (``"avg"``, ``"max"``, ``"avgmax"``, ``""`` for none).
        device, dtype: Factory arguments for the parameters.
        **kwargs: Only switched-off generic options (``drop_path_rate=0``) are accepted.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        drop_rate: float = 0.0,
        widths: tuple[int, int, int] = (32, 64, 128),
        global_pool: str = "avg",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes, in_chans, drop_rate, kwargs)
        dd = {"device": device, "dtype": dtype}
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(widths[0], **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(widths[0], widths[1], 3, 1, 1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(widths[1], **dd)
        self.act2 = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(widths[1], widths[2], 3, 1, 1, bias=False, **dd)
        self.bn3 = nn.BatchNorm2d(widths[2], **dd)
        self.act3 = nn.ReLU(inplace=True)

        self.feature_info = [
            {"num_chs": widths[0], "reduction": 1, "module": "act1"},
            {"num_chs": widths[1], "reduction": 1, "module": "act2"},
            {"num_chs": widths[2], "reduction": 2, "module": "act3"},
        ]
        self.init_head(widths[2], global_pool, drop_rate, **dd)

    def forward_features(self, x: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, 128, H // 2, W // 2]`` (``[B, 128, 4, 4]`` for 8x8)."""
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.pool(self.act2(self.bn2(self.conv2(x))))
        return self.act3(self.bn3(self.conv3(x)))


@register_backbone
def digits_cnn(pretrained: bool = False, **kwargs: Any) -> DigitsCNN:
    """The small CNN for 8x8 one-channel digits (128 pooled features)."""
    return build_variant(
        DigitsCNN, "digits_cnn", pretrained, default_cfgs, _cfg, (0, 1, 2), **kwargs
    )
