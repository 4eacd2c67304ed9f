"""The channel dependency graph groups coupled channels and refuses what it cannot resolve."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimtorch.models import create_model
from slimtorch.prune.channel import ChannelGraphError, build_graph
from slimtorch.prune.channel.spaces import Cat, Expand, SpaceSet


def _group(graph, producer: str):
    return next(g for g in graph.groups if producer in g.producers)


def test_spaces_indices_and_scatter() -> None:
    spaces = SpaceSet()
    a, b = spaces.new_leaf(3, "a"), spaces.new_leaf(2, "b")
    space = Expand(Cat((a, b)), 2)  # 10 positions: a0 a0 a1 a1 a2 a2 b0 b0 b1 b1
    keep = {spaces.find(a): torch.tensor([1]), spaces.find(b): torch.tensor([0, 1])}
    assert spaces.indices(space, keep).tolist() == [2, 3, 6, 7, 8, 9]
    parts = dict(spaces.scatter(space, torch.arange(10.0)))
    assert parts[spaces.find(a)].tolist() == [1.0, 5.0, 9.0]
    assert parts[spaces.find(b)].tolist() == [13.0, 17.0]


def test_unify_merges_notes_and_refuses_size_mismatch() -> None:
    spaces = SpaceSet()
    a, b, c = spaces.new_leaf(4, "a"), spaces.new_leaf(4, "b"), spaces.new_leaf(5, "c")
    spaces.fix(a, "model output")
    assert spaces.unify(a, b, "add")
    assert spaces.find(a) == spaces.find(b)
    assert spaces.fixed[spaces.find(b)] == ["model output"]
    assert not spaces.unify(b, c, "add")
    assert "joins 4 and 5 channels" in spaces.blocked[spaces.find(c)][0]


def test_resnet_stage_is_one_group_with_projection_shortcut() -> None:
    model = create_model("resnet20", num_classes=10, in_channels=3, input_size=16)
    graph = build_graph(model, torch.randn(2, 3, 16, 16))
    stage1 = _group(graph, "conv1")
    assert stage1.producers == ["conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"]
    assert {"bn1", "layer1.0.bn2", "layer2.0.conv1", "layer2.0.shortcut.0"} <= set(stage1.members)
    stage2 = _group(graph, "layer2.0.shortcut.0")
    assert set(stage2.producers) == {
        "layer2.0.conv2",
        "layer2.0.shortcut.0",
        "layer2.1.conv2",
        "layer2.2.conv2",
    }
    assert "layer2.0.shortcut.1" in stage2.members
    inner = _group(graph, "layer1.0.conv1")
    assert inner.members == ["layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2"]
    fc = _group(graph, "fc")
    assert fc.fixed == ["model output"] and fc.blocked == []
    assert "fc" in _group(graph, "layer3.0.conv2").members  # stage 3 feeds the classifier
    assert all(not g.blocked for g in graph.groups)


def test_mobilenet_depthwise_joins_the_expansion_group() -> None:
    model = create_model("mobilenetv2", num_classes=10, in_channels=3, input_size=8)
    graph = build_graph(model, torch.randn(1, 3, 8, 8))
    expansion = _group(graph, "features.2.conv.0.0")
    assert expansion.producers == ["features.2.conv.0.0"]  # depthwise conv produces no group
    assert expansion.members == [
        "features.2.conv.0.0",
        "features.2.conv.0.1",
        "features.2.conv.1.0",  # depthwise
        "features.2.conv.1.1",
        "features.2.conv.2",  # projection reads it
    ]
    residual = _group(graph, "features.2.conv.2")
    assert residual.producers == ["features.2.conv.2", "features.3.conv.2"]


def test_flatten_before_linear_maps_each_channel_to_its_pixels() -> None:
    model = create_model("lenet5", num_classes=10, in_channels=1, input_size=28)
    graph = build_graph(model, torch.randn(2, 1, 28, 28))
    use = graph.layers["fc1"]
    assert isinstance(use.in_space, Expand) and use.in_space.factor == 25
    assert _group(graph, "features.3").members == ["features.3", "fc1"]


class CatNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(12)
        self.dw = nn.Conv2d(12, 24, 3, padding=1, groups=12)  # depthwise, multiplier 2
        self.head = nn.Conv2d(24, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1)))
        return self.head(self.dw(y)).mean(dim=(2, 3))


def test_concatenation_and_depthwise_multiplier() -> None:
    graph = build_graph(CatNet(), torch.randn(2, 3, 6, 6))
    a, b = _group(graph, "a"), _group(graph, "b")
    assert a.members == ["a", "bn", "dw", "head"]
    assert b.members == ["b", "bn", "dw", "head"]
    assert isinstance(graph.layers["bn"].out_space, Cat)
    dw = graph.layers["dw"].out_space
    assert isinstance(dw, Expand) and dw.factor == 2


def test_grouped_conv_requires_equal_blocks() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 16, 1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, groups=4),
        nn.ReLU(),
        nn.Conv2d(32, 2, 1),
    )
    graph = build_graph(net, torch.randn(1, 3, 5, 5))
    assert _group(graph, "0").blocks == 4  # its consumer is grouped
    assert _group(graph, "2").blocks == 4  # its own outputs come in 4 groups


class Roll(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.other = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.roll(self.conv(x), 1, dims=1) + self.other(x)
        return self.head(y)


def test_unknown_op_blocks_the_group_by_name() -> None:
    graph = build_graph(Roll(), torch.randn(1, 3, 4, 4))
    conv = _group(graph, "conv")
    assert conv.blocked and "roll" in conv.blocked[0]
    # the output of the unknown op is tied to `other` by the addition: blocked as well
    assert _group(graph, "other").blocked
    assert not _group(graph, "head").blocked


class HardCoded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).view(-1, 16))


def test_hard_coded_view_is_refused() -> None:
    graph = build_graph(HardCoded(), torch.randn(2, 1, 4, 4))
    reason = _group(graph, "conv").blocked[0]
    assert "hard-codes the size 16" in reason


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.sum() > 0:  # data-dependent control flow
            return y
        return -y


def test_untraceable_model_raises_a_clear_error() -> None:
    with pytest.raises(ChannelGraphError, match=r"torch\.fx cannot trace Untraceable"):
        build_graph(Untraceable(), torch.randn(1, 1, 2, 2))


def test_bad_example_input_raises() -> None:
    with pytest.raises(ChannelGraphError, match="failed on example_input"):
        build_graph(nn.Sequential(nn.Linear(4, 2)), torch.randn(1, 5))


def test_input_coupled_residual_is_fixed() -> None:
    class Res(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)
            self.head = nn.Conv2d(4, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(x + self.conv(x))

    graph = build_graph(Res(), torch.randn(1, 4, 3, 3))
    assert _group(graph, "conv").fixed == ["model input 'x'"]


def test_graph_does_not_change_mode_or_statistics() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    net.train()
    before = net[1].running_mean.clone()
    build_graph(net, torch.randn(4, 1, 3, 3) + 5)
    assert net.training and net[1].training
    torch.testing.assert_close(net[1].running_mean, before)


class TokenBlock(nn.Module):
    """Linear layers over the features of (N, T, C) tokens, with a residual on the input."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down, self.head = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.down(torch.relu(self.up(x)))
        return self.head(h.mean(1))


def test_linear_layers_on_token_inputs_are_grouped() -> None:
    # the model input's channel axis is a guess (axis 1, T here) until a Linear reads it
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    graph = build_graph(mlp, torch.randn(2, 5, 8))
    hidden = _group(graph, "0")
    assert (hidden.size, hidden.fixed, hidden.blocked, hidden.members) == (16, [], [], ["0", "2"])
    block = build_graph(TokenBlock(), torch.randn(2, 5, 8))
    assert not _group(block, "up").fixed and not _group(block, "up").blocked
    # the residual ties `down` to the input's 8 features: fixed for that reason, not blocked
    down = _group(block, "down")
    assert down.fixed == ["model input 'x'"] and not down.blocked


def test_prune_channels_shrinks_token_mlps_and_keeps_them_running() -> None:
    from slimtorch.prune import ChannelPruneConfig, prune_channels_

    torch.manual_seed(0)
    model, x = TokenBlock(), torch.randn(2, 5, 8)
    report = prune_channels_(model, ChannelPruneConfig(ratio=0.5, round_to=1), x)
    assert (model.up.out_features, model.down.in_features, model.down.out_features) == (8, 8, 8)
    assert model(x).shape == (2, 3)
    assert [r.action for r in report.rows] == ["pruned", "fixed", "fixed"]


class SpatialMix(nn.Module):
    """A Linear over the pixels of each channel (an MLP-Mixer token mix), then one over the
    features it made."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.mix = nn.Linear(64, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.mix(self.conv(x).flatten(2)))  # (N, 16, 32): reads the pixel axis
        return self.head(y).mean(1)


def test_a_linear_reading_another_axis_blocks_that_group_and_keeps_its_own() -> None:
    from slimtorch.prune import ChannelPruneConfig, prune_channels_

    torch.manual_seed(0)
    model, x = SpatialMix(), torch.randn(2, 3, 8, 8)
    report = prune_channels_(model, ChannelPruneConfig(ratio=0.5, round_to=1), x)
    rows = {r.name: r for r in report.rows}
    assert rows["conv"].action == "skipped"
    assert rows["conv"].reason == "Linear module 'mix' reads features on another axis"
    assert (rows["mix"].action, rows["mix"].channels_after) == ("pruned", 16)
    assert (model.conv.out_channels, model.mix.in_features, model.head.in_features) == (16, 64, 16)
    assert model(x).shape == (2, 10)
