"""Exact values of channel pruning (graph, slicing, scoring), N:M masks and compact storage."""

from __future__ import annotations

from typing import cast

import pytest
import torch
from torch import nn

from slimtorch.prune import compact_state_dict, nm_mask
from slimtorch.prune.channel import (
    ChannelGraphError,
    ChannelPruneConfig,
    ChannelPruneReport,
    build_graph,
    prune_channels_,
    slice_layer,
)
from slimtorch.prune.channel.check import reference_outputs, swap_and_check
from slimtorch.prune.channel.layers import is_nm, nm_pattern

# ---------------------------------------------------------------- compact storage


def test_compact_csr_column_index_is_int16_up_to_int16_max_columns() -> None:
    t = torch.zeros(1, 32767)  # width 32767 == int16 max still fits
    t[0, 0] = 1.0
    assert compact_state_dict({"w": t}, format="csr")["w::col"].dtype == torch.int16


# ---------------------------------------------------------------- N:M masks


@pytest.mark.parametrize("m", [4, 8, 16, 32])
def test_nm_mask_ties_keep_the_first_n_of_each_group(m: int) -> None:
    mask = nm_mask(torch.ones(1, m), 2, m)
    assert mask.reshape(-1).nonzero().flatten().tolist() == [0, 1]


@pytest.mark.parametrize("dim", [-3, 2])
def test_nm_mask_rejects_a_dim_outside_the_weight(dim: int) -> None:
    with pytest.raises(ValueError):
        nm_mask(torch.randn(4, 8), 2, 4, dim=dim)


def test_all_pruned_mask_is_not_an_nm_pattern() -> None:
    # 0 kept per group is not N:M (N must be >= 1)
    assert nm_pattern(torch.zeros(2, 4, dtype=torch.bool)) is None


def test_is_nm_needs_exactly_n_kept_per_group() -> None:
    assert is_nm(torch.tensor([[True, False, False, False]]), 2, 4) is False


# ---------------------------------------------------------------- slicing layers


def test_sliced_batchnorm_keeps_num_batches_tracked() -> None:
    bn = nn.BatchNorm2d(4)
    assert bn.num_batches_tracked is not None
    bn.num_batches_tracked.fill_(7)
    assert int(slice_layer(bn, None, torch.tensor([0, 2])).num_batches_tracked) == 7


def test_sliced_batchnorm_keeps_eps_and_momentum() -> None:
    new = slice_layer(nn.BatchNorm2d(4, eps=1e-3, momentum=0.3), None, torch.tensor([0, 1]))
    assert new.eps == 1e-3
    assert new.momentum == 0.3


def test_slicing_output_channels_slices_the_bias_mask() -> None:
    lin = nn.Linear(3, 4)
    lin.register_buffer("bias_mask", torch.tensor([True, False, True, False]))
    assert slice_layer(lin, None, torch.tensor([1, 2])).bias_mask.tolist() == [False, True]


def test_slicing_keeps_a_frozen_weight_frozen() -> None:
    lin = nn.Linear(3, 4)
    lin.weight.requires_grad_(False)
    new = slice_layer(lin, None, torch.tensor([0, 1]))
    assert new.weight.requires_grad is False
    assert new.bias.requires_grad is True


def test_grouped_conv_slice_must_keep_equal_counts_per_group() -> None:
    conv = nn.Conv2d(8, 8, 1, groups=2)
    # inputs: 1 kept in group 0 ([0]), 3 in group 1 ([4, 5, 6])
    with pytest.raises(ValueError):
        slice_layer(conv, torch.tensor([0, 4, 5, 6]), torch.tensor([0, 4]))


# ---------------------------------------------------------------- global scoring


def _linear(net: nn.Sequential, i: int) -> nn.Linear:
    return cast(nn.Linear, net[i])


def _mlp(width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(8, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 2)
    )


def _conv(net: nn.Sequential, i: int) -> nn.Conv2d:
    return cast(nn.Conv2d, net[i])


def test_global_scope_renormalises_groups_with_a_depthwise_writer() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, groups=8),  # depthwise x2: outputs 2k, 2k+1 read channel k
        nn.ReLU(),
        nn.Conv2d(16, 16, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 2),
    )
    low_high = torch.tensor([0.8] * 4 + [1.2] * 4)  # each layer's L1 over its mean: 0.8 / 1.2
    with torch.no_grad():
        _conv(net, 0).weight.copy_(low_high.view(8, 1, 1, 1).expand(8, 3, 3, 3))
        _conv(net, 2).weight.copy_(
            low_high.repeat_interleave(2).view(16, 1, 1, 1).expand(16, 1, 3, 3)
        )
        _conv(net, 4).weight.copy_(
            torch.tensor([0.9] * 8 + [1.1] * 8).view(16, 1, 1, 1).expand(16, 16, 1, 1)
        )
    # group of conv 0 (+ depthwise, summing its two outputs per channel): (0.8 + 1.6) / 2 = 1.2
    # and 1.8, mean 1.5, renormalised to 0.8 / 1.2. Group of conv 4: 0.9 / 1.1. The 12 lowest
    # of 24 are 4 x 0.8 and 8 x 0.9; without renormalising they would be 8 x 0.9 and 4 x 1.1.
    cfg = ChannelPruneConfig(ratio=0.5, scope="global", round_to=1)
    prune_channels_(net, cfg, torch.randn(2, 3, 9, 9))
    widths = (_conv(net, 0).out_channels, _conv(net, 2).out_channels, _conv(net, 4).out_channels)
    assert widths == (4, 8, 8)


def test_global_scope_caps_each_group_at_max_layer_ratio() -> None:
    net = _mlp(16)
    with torch.no_grad():
        _linear(net, 0).weight.fill_(1e-3)
        _linear(net, 0).weight[0].fill_(100.0)  # one strong filter, 15 near-zero ones
        _linear(net, 2).weight.copy_((1.0 + torch.arange(16.0) / 100).unsqueeze(1).expand(16, 16))
    cfg = ChannelPruneConfig(ratio=0.5, scope="global", round_to=1, max_layer_ratio=0.8)
    prune_channels_(net, cfg, torch.randn(4, 8))
    # 15 of layer 0 rank lowest, but it may lose at most floor(16 * 0.8) = 12
    assert _linear(net, 0).out_features == 16 - 12
    # layer 2 loses the 16 - 15 = 1 remaining removal (its lowest filter)
    assert _linear(net, 2).out_features == 15


def test_global_scope_removes_floor_of_ratio_times_channels() -> None:
    torch.manual_seed(0)
    net = _mlp(50)
    cfg = ChannelPruneConfig(ratio=0.29, scope="global", round_to=1)
    report = prune_channels_(net, cfg, torch.randn(4, 8))
    removed = sum(r.channels_before - r.channels_after for r in report.rows)
    assert removed == 29  # 0.29 * 100 is 28.999999999999996 in floating point


# ---------------------------------------------------------------- check and report


def test_swap_and_check_rejects_nan_outputs_and_restores_the_layer() -> None:
    net = nn.Sequential(nn.Linear(2, 4), nn.Linear(4, 1))
    x = torch.ones(3, 2)
    original = net[1]
    bad = nn.Linear(4, 1)
    with torch.no_grad():
        bad.weight.fill_(float("nan"))
    with pytest.raises(ChannelGraphError):
        swap_and_check(net, {"1": bad}, x, reference_outputs(net, x))
    assert net[1] is original


def test_report_flops_ratio_is_flops_after_over_before() -> None:
    report = ChannelPruneReport({}, [], 100, 50, 1000, 200)
    assert report.to_dict()["totals"]["flops_ratio"] == pytest.approx(200 / 1000)


# ---------------------------------------------------------------- graph walk


class _TwoGroupedConsumers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 12, 1)
        self.b = nn.Conv2d(3, 12, 1)
        self.g2 = nn.Conv2d(12, 12, 1, groups=2)
        self.g3 = nn.Conv2d(12, 12, 1, groups=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.a(x), self.b(x)
        return self.g2(a) + self.g3(b) + (a + b)


def test_tied_group_blocks_are_the_lcm_of_its_consumers_groups() -> None:
    graph = build_graph(_TwoGroupedConsumers(), torch.randn(2, 3, 4, 4))
    group = next(g for g in graph.groups if g.name == "a")
    assert group.blocks == 6  # lcm(2, 3)


class _ChannelMean(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 1)
        self.h = nn.Conv2d(1, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h(self.c(x).mean(1, keepdim=True))


def test_reducing_over_the_channel_axis_blocks_the_group() -> None:
    graph = build_graph(_ChannelMean(), torch.randn(2, 3, 4, 4))
    group = next(g for g in graph.groups if g.name == "c")
    assert any("reduces over the channel axis" in b for b in group.blocked)


class _BatchSum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 1)
        self.d = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(self.c(x).sum(0))  # unbatched conv: channels move to dim 0


def test_summing_away_the_batch_axis_skips_the_group() -> None:
    net = _BatchSum()
    x = torch.randn(2, 3, 4, 4)
    report = prune_channels_(net, ChannelPruneConfig(ratio=0.5, round_to=1), x)
    row = next(r for r in report.rows if r.name == "c")
    assert row.action == "skipped"
    assert net.c.out_channels == 8


class _FlattenChannels(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 1)
        self.d = nn.Conv1d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(self.c(x).flatten(1, 2))  # (N, 8, 4, 4) -> (N, 8 * 4, 4)


def test_flatten_of_channels_with_height_prunes_in_blocks_of_height() -> None:
    net = _FlattenChannels()
    x = torch.randn(2, 3, 4, 4)
    prune_channels_(net, ChannelPruneConfig(ratio=0.5, round_to=1), x)
    assert net.c.out_channels == 4
    assert net.d.in_channels == 4 * 4
    assert tuple(net(x).shape) == (2, 4, 4)


class _NegativeCat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(12, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.cat([self.a(x), self.b(x)], dim=-3))  # dim -3 is the channel axis


def test_cat_on_a_negative_channel_dim_is_understood() -> None:
    net = _NegativeCat()
    x = torch.randn(2, 3, 4, 4)
    graph = build_graph(net, x)
    assert [g.blocked for g in graph.groups] == [[], [], []]
    prune_channels_(net, ChannelPruneConfig(ratio=0.5, round_to=1), x)
    assert (net.a.out_channels, net.b.out_channels, net.c.in_channels) == (4, 2, 6)
    assert tuple(net(x).shape) == (2, 2, 4, 4)
