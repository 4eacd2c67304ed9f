"""Multi-layer perceptron: flatten, hidden Linear + ReLU layers, a Linear ``classifier``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from slimtorch.models.registry import register_model


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU] per hidden size -> Linear ``classifier``.

    Args:
        num_classes: Number of outputs.
        in_features: Number of input features (``in_channels * input_size**2``).
        hidden: Hidden layer widths; empty for a linear classifier.

    Example:
        >>> MLP(num_classes=10, in_features=64, hidden=(32,))(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, *, num_classes: int, in_features: int, hidden: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))  # (B, num_classes)


@register_model("mlp")
def mlp(
    *,
    num_classes: int,
    in_channels: int,
    input_size: int,
    hidden: Sequence[int] = (256, 128),
) -> nn.Module:
    """An MLP on flattened ``in_channels x input_size x input_size`` images.

    Example:
        >>> mlp(num_classes=10, in_channels=1, input_size=28).classifier.in_features
        128
    """
    if isinstance(hidden, int | str) or not all(
        isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden
    ):
        raise ValueError(f"mlp hidden must be a sequence of integers >= 1, got {hidden!r}")
    return MLP(
        num_classes=num_classes, in_features=in_channels * input_size * input_size, hidden=hidden
    )
