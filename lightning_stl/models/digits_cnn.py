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
from timm.layers import create_classifier
from timm.models import build_model_with_cfg
from torch import Tensor, nn

from lightning_stl.models.registry import check_unused_kwargs, register_backbone

__all__ = ["DigitsCNN"]


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (1, 8, 8),
        "pool_size": (4, 4),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        # sklearn load_digits pixels / 16
        "mean": (0.3053,),
        "std": (0.3760,),
        "first_conv": "conv1",
        "classifier": "fc",
        "description": "small CNN for 8x8 optdigits images, random initialisation",
        **kwargs,
    }


# read by timm.models.register_model: the pretrained config of each registered name (no weights)
default_cfgs = {"digits_cnn": _cfg()}


class DigitsCNN(nn.Module):
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
        super().__init__()
        check_unused_kwargs(kwargs, type(self).__name__)
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must lie in [0, 1), got {drop_rate}")
        dd = {"device": device, "dtype": dtype}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate

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

        self.num_features = self.head_hidden_size = widths[2]
        self.feature_info = [
            {"num_chs": widths[0], "reduction": 1, "module": "act1"},
            {"num_chs": widths[1], "reduction": 1, "module": "act2"},
            {"num_chs": widths[2], "reduction": 2, "module": "act3"},
        ]
        self.global_pool, self.fc = create_classifier(
            self.num_features, num_classes, pool_type=global_pool, **dd
        )
        self.head_drop = nn.Dropout(drop_rate)
        self.apply(_init_weights)

    def get_classifier(self) -> nn.Module:
        """The final linear layer (``nn.Identity`` when ``num_classes == 0``)."""
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier by a freshly initialised one with ``num_classes`` outputs."""
        ref = self.conv1.weight
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
        self.fc.apply(_init_weights)
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def forward_features(self, x: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, 128, H // 2, W // 2]`` (``[B, 128, 4, 4]`` for 8x8)."""
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.pool(self.act2(self.bn2(self.conv2(x))))
        return self.act3(self.bn3(self.conv3(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool, dropout, classify: ``[B, 128, h, w] -> [B, num_classes]`` (``[B, 128]`` if
        ``pre_logits`` or ``num_classes == 0``)."""
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, num_classes]`` (pooled features ``[B, 128]`` if no classifier)."""
        return self.forward_head(self.forward_features(x))


def _init_weights(module: nn.Module) -> None:
    """He-normal (fan-out) convolutions, unit BN, zero classifier bias."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


@register_backbone
def digits_cnn(pretrained: bool = False, **kwargs: Any) -> DigitsCNN:
    """The small CNN for 8x8 one-channel digits (128 pooled features)."""
    return build_model_with_cfg(
        DigitsCNN,
        "digits_cnn",
        pretrained,
        feature_cfg={"out_indices": (0, 1, 2)},
        **kwargs,
    )
