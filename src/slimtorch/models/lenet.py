"""LeNet-5 (LeCun, Bottou, Bengio & Haffner, 1998, "Gradient-based learning applied to document
recognition", Proc. IEEE 86(11)), in its common modern form: ReLU and max-pooling instead of
scaled tanh and subsampling, and a fully connected C5.
"""

from __future__ import annotations

import torch
from torch import nn

from slimtorch.models.registry import register_model

#: Inputs below this size pad the second convolution too, so 8x8 digits still fit.
_SMALL_INPUT = 16


def _conv_out(size: int, kernel: int, padding: int) -> int:
    return size + 2 * padding - kernel + 1


class LeNet5(nn.Module):
    """conv5x5(6) -> pool -> conv5x5(16) -> pool -> fc1(120) -> fc2(84) -> ``classifier``.

    The first convolution is padded by 2 so a 28x28 input keeps its size (the original
    network read 32x32 images); the first Linear is sized from ``input_size``. Inputs smaller
    than 16x16 (sklearn's 8x8 digits) also pad the second convolution by 2.

    Args:
        num_classes: Number of outputs.
        in_channels: Number of input channels.
        input_size: Height (= width) of the input; at least 4.

    Example:
        >>> LeNet5(num_classes=10, in_channels=1, input_size=28).fc1.in_features
        400
    """

    def __init__(self, *, num_classes: int, in_channels: int, input_size: int) -> None:
        super().__init__()
        if input_size < 4:
            raise ValueError(
                f"lenet5 needs input_size >= 4 (two 2x2 poolings), got {input_size}; "
                "resize the images or use the mlp"
            )
        pad2 = 2 if input_size < _SMALL_INPUT else 0
        size = _conv_out(input_size, 5, 2) // 2
        size = _conv_out(size, 5, pad2) // 2
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5, padding=pad2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(16 * size * size, 120)
        self.relu1 = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(120, 84)
        self.relu2 = nn.ReLU(inplace=True)
        self.classifier = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(self.features(x))  # (B, 16 * s * s)
        x = self.relu2(self.fc2(self.relu1(self.fc1(x))))
        return self.classifier(x)  # (B, num_classes)


@register_model("lenet5")
def lenet5(*, num_classes: int, in_channels: int, input_size: int) -> nn.Module:
    """LeNet-5 for ``input_size`` x ``input_size`` images (see :class:`LeNet5`).

    Example:
        >>> lenet5(num_classes=10, in_channels=1, input_size=8)(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """
    return LeNet5(num_classes=num_classes, in_channels=in_channels, input_size=input_size)
