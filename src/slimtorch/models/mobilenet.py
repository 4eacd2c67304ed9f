"""MobileNetV2 (Sandler, Howard, Zhu, Zhmoginov & Chen, 2018, "MobileNetV2: Inverted Residuals
and Linear Bottlenecks", arXiv:1801.04381).

Small-input variant: the stem convolution and the first downsampling stage (24 channels) use
stride 1 instead of 2, so the network downsamples 8x instead of 32x and a 28x28 or 32x32 input
ends as a 4x4 map (an 8x8 input as 1x1) instead of vanishing.
"""

from __future__ import annotations

import torch
from torch import nn

from slimtorch.models.registry import register_model

#: (expansion t, output channels c, repeats n, stride s) per stage, Table 2 of the paper,
#: with the small-input stride 1 in the second stage.
SMALL_INPUT_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never dropping more than 10%.

    Example:
        >>> make_divisible(32 * 0.35)
        16
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def _conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int, groups: int = 1) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expansion -> 3x3 depthwise -> 1x1 linear projection, residual when shapes match.

    Args:
        c_in: Input channels.
        c_out: Output channels.
        stride: Stride of the depthwise convolution.
        expand: Expansion ratio ``t``.

    Example:
        >>> InvertedResidual(16, 16, stride=1, expand=6)(torch.randn(1, 16, 4, 4)).shape
        torch.Size([1, 16, 4, 4])
    """

    def __init__(self, c_in: int, c_out: int, *, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.use_residual = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn_relu(c_in, hidden, 1, 1))
        layers += [
            _conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 for small inputs (see the module docstring).

    Args:
        num_classes: Number of outputs.
        in_channels: Number of input channels.
        width_mult: Multiplier on every layer's channels (rounded to multiples of 8).
        dropout: Dropout probability before the classifier.

    Example:
        >>> m = MobileNetV2(num_classes=10, in_channels=3, width_mult=0.5)
        >>> m(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self, *, num_classes: int, in_channels: int, width_mult: float = 1.0, dropout: float = 0.2
    ) -> None:
        super().__init__()
        c_stem = make_divisible(32 * width_mult)
        self.last_channels = make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [_conv_bn_relu(in_channels, c_stem, 3, 1)]
        c_in = c_stem
        for t, c, n, s in SMALL_INPUT_STAGES:
            c_out = make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(c_in, c_out, stride=s if i == 0 else 1, expand=t))
                c_in = c_out
        layers.append(_conv_bn_relu(c_in, self.last_channels, 1, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.last_channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(self.avgpool(self.features(x)))  # (B, last_channels)
        return self.classifier(self.dropout(x))  # (B, num_classes)


@register_model("mobilenetv2")
def mobilenetv2(
    *,
    num_classes: int,
    in_channels: int,
    input_size: int,
    width_mult: float = 1.0,
    dropout: float = 0.2,
) -> nn.Module:
    """MobileNetV2 with the small-input strides (see :class:`MobileNetV2`).

    Example:
        >>> mobilenetv2(num_classes=10, in_channels=1, input_size=28, width_mult=0.25)
        MobileNetV2(...)
    """
    if isinstance(width_mult, bool) or not isinstance(width_mult, int | float) or width_mult <= 0:
        raise ValueError(f"mobilenetv2 width_mult must be a number > 0, got {width_mult!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ValueError(f"mobilenetv2 dropout must be in [0, 1), got {dropout!r}")
    return MobileNetV2(
        num_classes=num_classes, in_channels=in_channels, width_mult=width_mult, dropout=dropout
    )
