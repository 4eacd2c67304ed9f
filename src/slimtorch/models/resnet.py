"""CIFAR-style ResNets (He, Zhang, Ren & Sun, 2015, "Deep Residual Learning for Image
Recognition", arXiv:1512.03385, section 4.2): a 3x3 stem, three stages of ``n`` BasicBlocks
with 16/32/64 channels, global average pooling and a Linear ``fc``; 6n+2 weighted layers.

Where a block changes the shape (stride 2 or more channels) the shortcut is a 1x1 convolution
followed by BatchNorm (the paper's option B), not the zero-padding identity (option A): it is a
standard layer that pruning, quantization and export handle like any other.
"""

from __future__ import annotations

import torch
from torch import nn

from slimtorch.models.registry import register_model


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU.

    Args:
        in_planes: Input channels.
        planes: Output channels.
        stride: Stride of the first convolution (and of the projection shortcut).

    A fused convolution that takes the residual in (``adds_residual``, set by
    :func:`slimtorch.decompose.fuse_tucker_`) replaces ``conv2``, ``bn2``, the addition and
    ``relu2``: ``FUSED_RESIDUAL`` names those modules for it.

    Example:
        >>> BasicBlock(16, 32, stride=2)(torch.randn(1, 16, 8, 8)).shape
        torch.Size([1, 32, 4, 4])
    """

    FUSED_RESIDUAL = ("conv2", "bn2", "relu2")

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        if getattr(self.conv2, "adds_residual", False):  # bn2, + shortcut and relu2 fused in
            return self.conv2(out, self.shortcut(x))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images (works for any input size >= 1).

    Args:
        n: Blocks per stage (3 -> ResNet-20, 5 -> ResNet-32, 9 -> ResNet-56).
        num_classes: Number of outputs.
        in_channels: Number of input channels.

    Example:
        >>> CifarResNet(n=1, num_classes=10, in_channels=3)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, *, n: int, num_classes: int, in_channels: int) -> None:
        super().__init__()
        if n < 1:
            raise ValueError(f"CifarResNet needs n >= 1 blocks per stage, got {n}")
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # Kaiming (He et al. 2015, arXiv:1502.01852) for convolutions, unit BatchNorm.
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (B, 16, H, W)
        x = self.layer3(self.layer2(self.layer1(x)))  # (B, 64, H/4, W/4)
        return self.fc(self.flatten(self.avgpool(x)))  # (B, num_classes)


def _builder(depth: int) -> None:
    n = (depth - 2) // 6

    def build(*, num_classes: int, in_channels: int, input_size: int) -> nn.Module:
        return CifarResNet(n=n, num_classes=num_classes, in_channels=in_channels)

    build.__name__ = f"resnet{depth}"
    build.__doc__ = f"ResNet-{depth} (n={n}) for CIFAR-sized inputs; see :class:`CifarResNet`."
    register_model(f"resnet{depth}")(build)


for _depth in (20, 32, 56):
    _builder(_depth)
