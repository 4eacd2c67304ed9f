"""Tests of slimtorch.core.measure.flops against hand-computed FLOP counts (FLOP = 2 MAC)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from slimtorch.core.measure import count_flops


@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_exact(bias: bool) -> None:
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=bias)
    report = count_flops(conv, torch.randn(1, 3, 16, 16))
    # 8x16x16 outputs, each a 3x3x3 dot product; the bias is not counted
    assert report.total_flops == 2 * 8 * 16 * 16 * 3 * 3 * 3 == 110592
    assert report.total_macs == 55296


def test_linear_exact() -> None:
    report = count_flops(nn.Linear(100, 10), torch.randn(4, 100))
    assert (report.total_flops, report.total_macs) == (2 * 4 * 100 * 10, 4000)
    (row,) = report.rows
    assert (row.name, row.module_type, row.params, row.output_shape) == (
        "",
        "Linear",
        1010,
        (4, 10),
    )


def test_strided_conv() -> None:
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    # output 8x8 per channel
    assert count_flops(conv, torch.randn(1, 3, 16, 16)).total_flops == 2 * 8 * 8 * 8 * 27


def test_grouped_and_depthwise_conv() -> None:
    grouped = nn.Conv2d(8, 16, 3, padding=1, groups=4)  # each output sees 8/4 = 2 channels
    assert count_flops(grouped, torch.randn(1, 8, 10, 10)).total_flops == 2 * 16 * 100 * 2 * 9
    depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)  # each output sees 1 channel
    assert count_flops(depthwise, torch.randn(2, 8, 10, 10)).total_flops == 2 * 2 * 8 * 100 * 9


def test_transposed_conv() -> None:
    up = nn.ConvTranspose2d(4, 2, 2, stride=2)
    # every input element (4 ch x 5 x 5) is multiplied into 2 ch x 2 x 2 outputs
    assert count_flops(up, torch.randn(1, 4, 5, 5)).total_flops == 2 * 4 * 25 * 2 * 4


def test_linear_on_3d_input_and_bmm() -> None:
    class Gram(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 5, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.proj(x)  # (2, 3, 5): a (6, 4) @ (4, 5) matmul
            return torch.matmul(h, h.transpose(1, 2))  # (2, 3, 5) @ (2, 5, 3): a bmm

    report = count_flops(Gram(), torch.randn(2, 3, 4))
    rows = {r.name: r for r in report.rows}
    assert rows["proj"].flops == 2 * 6 * 4 * 5
    assert rows["proj"].output_shape == (2, 3, 5)
    assert rows[""].flops == 2 * 2 * 3 * 5 * 3
    assert report.total_flops == 240 + 180


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)) + x)  # residual add and relu in forward()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.block(x)).flatten(1))


def test_rows_per_layer_with_residual() -> None:
    report = count_flops(Net(), torch.randn(2, 4, 6, 6))
    rows = {r.name: r for r in report.rows}
    # the root runs only a view (flatten) itself, so it has no row of its own
    assert list(rows) == ["block", "block.conv", "block.bn", "pool", "fc"]
    conv_flops = 2 * (2 * 4 * 36) * (4 * 9)
    fc_flops = 2 * 2 * 4 * 3
    assert rows["block.conv"].flops == conv_flops and rows["block.conv"].macs == conv_flops // 2
    assert rows["fc"].flops == fc_flops
    assert report.total_flops == conv_flops + fc_flops == sum(r.flops for r in report.rows)
    assert report.total_macs * 2 == report.total_flops
    # the residual add and the relu run in Block.forward: 2 x 288 elements
    assert rows["block"].elementwise_flops == 2 * 288 and rows["block"].flops == 0
    assert rows["block.bn"].elementwise_flops == 288
    assert rows["pool"].output_shape == (2, 4, 1, 1) and rows["pool"].elementwise_flops == 8
    assert (rows["block.bn"].params, rows["fc"].params, rows["block"].params) == (8, 15, 0)
    assert (
        report.module_flops("block") == conv_flops and report.module_flops("") == report.total_flops
    )
    assert json.loads(json.dumps(report.to_dict()))["total_flops"] == report.total_flops
    table = report.to_table()
    assert "block.conv" in table and f"{report.total_flops / 1e6:.3f}" in table


def test_restores_training_mode_and_leaves_bn_stats() -> None:
    net = Net().train()
    mean = net.block.bn.running_mean.clone()
    count_flops(net, torch.randn(2, 4, 6, 6))
    assert net.training and net.block.bn.training
    torch.testing.assert_close(net.block.bn.running_mean, mean)  # ran in eval mode


def test_shared_module_called_twice() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.fc(x))

    report = count_flops(Twice(), torch.randn(1, 3))
    (fc,) = [r for r in report.rows if r.name == "fc"]
    assert (fc.calls, fc.flops) == (2, 2 * 2 * 3 * 3)


def test_tuple_and_dict_inputs() -> None:
    class Two(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a @ b

    a, b = torch.randn(3, 4), torch.randn(4, 5)
    assert count_flops(Two(), (a, b)).total_flops == 2 * 3 * 4 * 5
    assert count_flops(Two(), {"a": a, "b": b}).total_flops == 2 * 3 * 4 * 5


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.b.weight = self.a.weight  # one 8x8 weight in two layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def test_tied_weights_are_counted_once_in_the_total() -> None:
    model = _Tied()
    report = count_flops(model, torch.randn(2, 8))
    assert [r.params for r in report.rows if r.name] == [72, 72]  # each layer owns the weight
    assert report.params == sum(p.numel() for p in model.parameters()) == 80
    assert report.to_dict()["total_params"] == 80
    table = report.to_table().splitlines()
    assert table[-2].split()[2] == "80"
    assert table[-1] == "(64 parameters are shared between layers: the total counts them once)"
