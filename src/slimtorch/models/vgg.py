"""VGG-11 with BatchNorm (Simonyan & Zisserman, 2014, "Very Deep Convolutional Networks for
Large-Scale Image Recognition", arXiv:1409.1556, configuration A; BatchNorm after every
convolution as in Ioffe & Szegedy, 2015, arXiv:1502.03167).

Small-input variant: a max-pool is skipped when it would shrink the feature map below 1x1
(a 28x28 input keeps 4 of the 5 pools, an 8x8 input 3), and the three large fully connected
layers are replaced by global average pooling and one Linear ``classifier``.
"""

from __future__ import annotations

import torch
from torch import nn

from slimtorch.models.registry import register_model

#: Configuration A: output channels per 3x3 convolution, "M" for a 2x2 max-pool.
CONFIG_A: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
    """VGG feature extractor with BatchNorm, global average pooling and a Linear classifier.

    Args:
        cfg: Channels per convolution and ``"M"`` for pools (see :data:`CONFIG_A`).
        num_classes: Number of outputs.
        in_channels: Number of input channels.
        input_size: Height (= width) of the input; decides which pools are kept.

    Example:
        >>> VGG(CONFIG_A, num_classes=10, in_channels=3, input_size=32).num_pools
        5
    """

    def __init__(
        self, cfg: tuple[int | str, ...], *, num_classes: int, in_channels: int, input_size: int
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, size, self.num_pools = in_channels, input_size, 0
        for item in cfg:
            if item == "M":
                if size // 2 >= 1:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                    self.num_pools += 1
                continue
            assert isinstance(item, int)
            layers += [
                nn.Conv2d(channels, item, 3, padding=1, bias=False),
                nn.BatchNorm2d(item),
                nn.ReLU(inplace=True),
            ]
            channels = item
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))  # (B, 512, 1, 1)
        return self.classifier(self.flatten(x))  # (B, num_classes)


@register_model("vgg11-bn")
def vgg11_bn(*, num_classes: int, in_channels: int, input_size: int) -> nn.Module:
    """VGG-11 (configuration A) with BatchNorm for small inputs (see :class:`VGG`).

    Example:
        >>> vgg11_bn(num_classes=10, in_channels=1, input_size=28).num_pools
        4
    """
    return VGG(CONFIG_A, num_classes=num_classes, in_channels=in_channels, input_size=input_size)
