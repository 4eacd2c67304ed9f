"""Exact values of the fused Tucker layer's Python side: shape checks on the gradient path,
the kernel status per device, what fuse_tucker_ takes in and how its report reads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimtorch.decompose import FusedTuckerConv2d, TuckerConv2d, fuse_tucker_, fused
from slimtorch.decompose.fused import FuseRow


def _tucker(c_in: int = 4, c_out: int = 6, seed: int = 0) -> TuckerConv2d:
    torch.manual_seed(seed)
    return TuckerConv2d(c_in, c_out, 3, (3, 2), padding=1).eval()


def test_a_device_without_a_kernel_is_named() -> None:
    status = fused._kernel_status(torch.device("meta"))
    assert (status.available, status.detail) == (False, "no fused kernel for meta devices")


def test_a_report_row_says_yes_only_for_a_taken_in_residual() -> None:
    row = FuseRow("layer1.0.conv2", "fused", bn="layer1.0.bn2", relu="layer1.0.relu2")
    assert row.cells() == ("layer1.0.conv2", "fused", "layer1.0.bn2", "layer1.0.relu2", "-", "")
    row.residual = True
    assert row.cells()[4] == "yes"


def test_wrong_input_channels_raise_a_value_error_when_gradients_are_wanted() -> None:
    layer = FusedTuckerConv2d.from_tucker(_tucker()).train()
    with pytest.raises(ValueError, match=r"expects input \(N, 4, H, W\), got \(2, 3, 5, 5\)"):
        layer(torch.randn(2, 3, 5, 5))


def test_a_residual_of_the_wrong_shape_raises_when_gradients_are_wanted() -> None:
    layer = FusedTuckerConv2d.from_tucker(_tucker(), residual=True).train()
    with pytest.raises(ValueError, match=r"residual must have the output's shape \(2, 6, 5, 5\)"):
        layer(torch.randn(2, 4, 5, 5), torch.randn(1, 6, 1, 1))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = _tucker()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x))


def test_a_fused_layer_keeps_the_training_mode_of_the_conv_it_replaces() -> None:
    net = _Net().eval()
    fuse_tucker_(net)
    assert isinstance(net.conv, FusedTuckerConv2d) and net.conv.training is False
    net = _Net().train()
    fuse_tucker_(net)
    assert net.conv.training is True
