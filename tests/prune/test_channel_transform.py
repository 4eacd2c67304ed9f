"""prune_channels_ shrinks layers consistently: dead channels removed, outputs unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.fx._symbolic_trace import is_fx_tracing

from slimtorch.core.errors import TransformSkipError
from slimtorch.models import create_model
from slimtorch.prune.channel import (
    ChannelGraphError,
    ChannelPruneConfig,
    build_graph,
    prune_channels_,
    round_channels,
)

ZOO = {
    "mlp": (1, 28),
    "lenet5": (1, 28),
    "resnet20": (3, 16),
    "resnet56": (3, 8),
    "vgg11-bn": (3, 16),
    "mobilenetv2": (3, 8),
}


def _zoo(name: str) -> tuple[nn.Module, torch.Tensor]:
    c, s = ZOO[name]
    kwargs = {"width_mult": 0.35} if name == "mobilenetv2" else {}
    model = create_model(name, num_classes=10, in_channels=c, input_size=s, **kwargs).eval()
    return model, torch.randn(2, c, s, s)


@torch.no_grad()
def _kill(model: nn.Module, graph, root: int, removed: torch.Tensor) -> None:
    """Zero every parameter that writes the ``removed`` channels of one group."""
    spaces = graph.spaces
    for use in graph.layers.values():
        if root not in spaces.roots_of(use.out_space):
            continue
        module = model.get_submodule(use.name)
        n = module.weight.shape[0]
        kept = spaces.indices(use.out_space, {root: _complement(removed, _size(graph, root))})
        dead = torch.ones(n, dtype=torch.bool)
        dead[kept] = False
        module.weight[dead] = 0.0
        if module.bias is not None:
            module.bias[dead] = 0.0


def _size(graph, root: int) -> int:
    return next(g.size for g in graph.groups if g.root == root)


def _complement(removed: torch.Tensor, n: int) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[removed] = False
    return torch.nonzero(keep).flatten()


def _dead_channel_check(model: nn.Module, x: torch.Tensor, config: ChannelPruneConfig) -> None:
    graph = build_graph(model, x)
    gen = torch.Generator().manual_seed(1)
    for g in graph.groups:
        if g.fixed or g.blocked:
            continue
        per_block = g.size // g.blocks
        keep = g.size - int(g.size * config.ratio)  # round_to=1: floor(n * ratio) removed
        drop = per_block - -(-keep // g.blocks)  # each block keeps ceil(keep / blocks)
        removed = torch.cat(
            [
                torch.randperm(per_block, generator=gen)[:drop] + b * per_block
                for b in range(g.blocks)
            ]
        )
        _kill(model, graph, g.root, removed)
    with torch.no_grad():
        want = model(x)
    params = sum(p.numel() for p in model.parameters())
    report = prune_channels_(model, config, x)
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in model.parameters()) == report.params_after < params
    assert report.pruned and not report.skipped


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_dead_channels_are_removed_without_changing_outputs(name: str) -> None:
    model, x = _zoo(name)
    _dead_channel_check(model, x, ChannelPruneConfig(ratio=0.5, round_to=1))
    for g in build_graph(model, x).groups:
        assert not g.blocked


class CatGroupNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(14)
        self.dw = nn.Conv2d(14, 14, 3, padding=1, groups=14)  # depthwise over a concatenation
        self.p = nn.Conv2d(14, 16, 1)
        self.g = nn.Conv2d(16, 16, 3, padding=1, groups=4)  # grouped: pruned per group
        self.dw2 = nn.Conv2d(16, 32, 3, padding=1, groups=16)  # depthwise, multiplier 2
        self.bn2 = nn.BatchNorm2d(32)
        self.head = nn.Linear(32 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1)))
        y = self.g(torch.relu(self.p(self.dw(y))))
        y = torch.relu(self.bn2(self.dw2(y)))
        y = nn.functional.adaptive_avg_pool2d(y, 2)
        return self.head(y.view(y.size(0), -1))


def test_toy_concat_depthwise_and_grouped_convs() -> None:
    model = CatGroupNet().eval()
    with torch.no_grad():
        for bn in (model.bn, model.bn2):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 6, 6)
    _dead_channel_check(model, x, ChannelPruneConfig(ratio=0.5, round_to=1))
    assert model.bn.num_features == model.dw.groups == model.dw.out_channels == 4 + 3
    assert model.p.out_channels == model.g.in_channels == 8 and model.g.groups == 4
    assert model.g.out_channels == 8 and model.dw2.groups == 8 and model.dw2.out_channels == 16
    assert model.head.in_features == 16 * 4


def test_ratio_zero_changes_nothing() -> None:
    model, x = _zoo("resnet20")
    before = copy.deepcopy(model.state_dict())
    report = prune_channels_(model, ChannelPruneConfig(ratio=0.0), x)
    assert report.entry is None and not report.pruned
    assert {r.action for r in report.rows} == {"unchanged", "fixed"}
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "0.5", True])
def test_ratio_outside_range_raises(bad) -> None:
    with pytest.raises(ValueError, match="ratio"):
        ChannelPruneConfig(ratio=bad)


@pytest.mark.parametrize(
    ("field", "value"),
    [("importance", "l3"), ("scope", "layer"), ("round_to", 0), ("min_channels", 0),
     ("max_layer_ratio", 1.0), ("layer_ratios", {"a": 1.0}), ("layer_ratios", [0.5])],
)  # fmt: skip
def test_config_validation(field: str, value) -> None:
    with pytest.raises(ValueError, match=field):
        ChannelPruneConfig(**{field: value})


def test_config_round_trip() -> None:
    cfg = ChannelPruneConfig(ratio=0.3, scope="global", layer_ratios={"layer3.*": 0.5})
    assert ChannelPruneConfig.from_dict(cfg.to_dict()) == cfg


def test_rounding_to_eight_and_classifier_untouched() -> None:
    model, x = _zoo("resnet20")
    report = prune_channels_(model, ChannelPruneConfig(ratio=0.3), x)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            assert m.out_channels % 8 == 0
    assert model.fc.out_features == 10
    row = next(r for r in report.rows if r.name == "fc")
    assert row.action == "fixed" and "model output" in row.reason
    # keep 16 - 4 = 12 -> nearest multiple of 8, ties up: 16 (all); 64 - 19 = 45 -> 48
    assert model.layer1[0].conv1.out_channels == 16 and model.layer3[0].conv1.out_channels == 48
    row = next(r for r in report.rows if r.name == "layer1.0.conv1")
    assert row.action == "unchanged" and "after rounding to 8" in row.reason


def test_round_channels_rules() -> None:
    assert round_channels(45, 64, round_to=8) == 48
    assert round_channels(3, 64, round_to=8) == 8  # never below round_to
    assert round_channels(3, 6, round_to=8) == 6  # fewer channels than round_to: keep all
    assert round_channels(61, 64, round_to=8) == 64  # rounds up to all channels
    assert round_channels(5, 64, round_to=1, min_channels=10) == 10
    assert round_channels(5, 64, round_to=1, blocks=4) == 8


def test_include_exclude_and_strict() -> None:
    model, x = _zoo("resnet20")
    report = prune_channels_(
        model, ChannelPruneConfig(ratio=0.5), x, include=["layer1.*"], exclude=["layer1.0.conv2"]
    )
    names = {r.name: r for r in report.rows}
    assert set(names) == {"conv1", "layer1.0.conv1", "layer1.1.conv1", "layer1.2.conv1"}
    assert names["conv1"].action == "skipped" and "layer1.0.conv2" in names["conv1"].reason
    assert model.layer1[1].conv1.out_channels == 8 and model.conv1.out_channels == 16
    assert model.layer2[0].conv1.out_channels == 32
    fresh, _ = _zoo("resnet20")
    state = copy.deepcopy(fresh.state_dict())
    with pytest.raises(TransformSkipError, match="conv1: coupled layer"):
        prune_channels_(fresh, ChannelPruneConfig(), x, exclude=["layer1.0.conv2"], strict=True)
    assert all(torch.equal(v, state[k]) for k, v in fresh.state_dict().items())
    with pytest.raises(ValueError, match="match no module"):
        prune_channels_(fresh, ChannelPruneConfig(), x, include=["nope.*"])
    with pytest.raises(TypeError, match="list of glob"):
        prune_channels_(fresh, ChannelPruneConfig(), x, include="conv1")


def test_global_scope_hits_the_total_ratio_with_caps() -> None:
    model, x = _zoo("vgg11-bn")
    cfg = ChannelPruneConfig(ratio=0.4, scope="global", round_to=1, max_layer_ratio=0.6)
    report = prune_channels_(model, cfg, x)
    rows = [r for r in report.rows if r.action != "fixed"]
    before = sum(r.channels_before for r in rows)
    after = sum(r.channels_after for r in rows)
    assert after == before - int(0.4 * before)  # no cap binds at 0.4 with these scores
    assert all(r.channels_after >= r.channels_before * 0.4 for r in rows)
    sizes = {r.channels_after / r.channels_before for r in rows}
    assert len(sizes) > 1  # not uniform


def test_global_bn_scale_prunes_groups_without_batchnorm_locally() -> None:
    # |gamma| (0.05-0.5 after training) and a BN-less group's mean-normalised l1 scores (about
    # 1) do not share a scale: pooled together, the BN groups lost everything the ratio asked
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 10),
    ).eval()  # fmt: skip
    with torch.no_grad():
        net[1].weight.uniform_(0.05, 0.1)  # the first BN group holds the 16 smallest scales
        net[4].weight.uniform_(0.4, 0.5)
    cfg = ChannelPruneConfig(
        ratio=0.4, importance="bn_scale", scope="global", round_to=1, max_layer_ratio=0.9
    )
    report = prune_channels_(net, cfg, torch.randn(2, 3, 8, 8))
    # the pool is the 32 BN channels: floor(0.4 * 32) = 12 leave, all from the first group
    assert (net[0].out_channels, net[3].out_channels) == (16 - 12, 16)
    # the hidden linear loses floor(0.4 * 64) = 25 of its own, by l1
    assert net[8].out_features == 64 - 25
    rows = {r.name: r for r in report.rows}
    assert rows["8"].channels_after == 39


def test_layer_ratios_override() -> None:
    model, x = _zoo("vgg11-bn")
    cfg = ChannelPruneConfig(ratio=0.0, round_to=1, layer_ratios={"features.0": 0.75})
    report = prune_channels_(model, cfg, x)
    assert model.features[0].out_channels == 16 and model.features[4].out_channels == 128
    assert [r.name for r in report.pruned] == ["features.0"]


def test_skipped_group_is_reported_and_rest_pruned() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 16, 1)
            self.b = nn.Conv2d(16, 16, 1)
            self.head = nn.Conv2d(16, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.roll(self.b(torch.relu(self.a(x))), 1, dims=1))

    net, x = Net(), torch.randn(1, 3, 4, 4)
    report = prune_channels_(net, ChannelPruneConfig(ratio=0.5), x)
    rows = {r.name: r for r in report.rows}
    assert rows["a"].action == "pruned" and net.a.out_channels == 8
    assert rows["b"].action == "skipped" and "roll" in rows["b"].reason
    assert net.b.out_channels == 16
    with pytest.raises(TransformSkipError, match="roll"):
        prune_channels_(Net(), ChannelPruneConfig(ratio=0.5), x, strict=True)


class Sneaky(nn.Module):
    """Its real forward hard-codes the width, which tracing never sees."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 1)
        self.fc = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).mean(dim=(2, 3))
        if not is_fx_tracing():
            y = y.reshape(-1, 16)
        return self.fc(y)


def test_failed_forward_check_restores_the_model() -> None:
    net, x = Sneaky(), torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        want = net(x)
    with pytest.raises(ChannelGraphError, match="failed its forward check"):
        prune_channels_(net, ChannelPruneConfig(ratio=0.5), x)
    assert net.conv.out_channels == 16 and net.fc.in_features == 16
    with torch.no_grad():
        torch.testing.assert_close(net(x), want)


def test_report_dict_and_table() -> None:
    model, x = _zoo("lenet5")
    report = prune_channels_(model, ChannelPruneConfig(ratio=0.5, importance="l2"), x)
    d = report.to_dict()
    assert d["totals"]["params_after"] == sum(p.numel() for p in model.parameters())
    assert d["totals"]["flops_ratio"] < 1 and d["totals"]["params_ratio"] < 1
    assert d["entry"]["name"] == "prune.channels"
    assert d["entry"]["params"]["layers"]["fc1"] == {
        "type": "Linear",
        "in_features": 8 * 5 * 5,
        "out_features": 64,
    }
    rows = {g["name"]: g for g in d["groups"]}
    assert rows["features.0"]["action"] == "unchanged"  # 6 channels < round_to 8
    assert rows["fc2"]["channels_after"] == 40 and rows["fc2"]["importance"] == "l2"
    table = report.to_table()
    assert "fc1" in table and "120 -> 64" in table and "params 61,706 ->" in table
    assert model.slimtorch_arch["transforms"][-1] == d["entry"]


def test_masks_are_sliced_with_weights() -> None:
    from slimtorch.prune import MagnitudeConfig, prune_

    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    prune_(net, MagnitudeConfig(sparsity=0.5))
    prune_channels_(net, ChannelPruneConfig(ratio=0.5), torch.randn(2, 8))
    assert net[0].weight_mask.shape == net[0].weight.shape == (16, 8)
    assert net[2].weight_mask.shape == (4, 16)
    assert bool((net[2].weight[~net[2].weight_mask] == 0).all())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_groups_with_non_finite_weights_are_skipped_with_the_reason(bad: float) -> None:
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    with torch.no_grad():
        net[2].weight[3, 5] = bad  # writes the group of "2", reads the group of "0"
    x = torch.randn(4, 8)
    report = prune_channels_(net, ChannelPruneConfig(ratio=0.5, round_to=1), x)
    rows = {r.name: (r.action, r.channels_after, r.reason) for r in report.rows}
    reason = "2.weight hold NaN/Inf values, so channel importance is undefined"
    assert rows["0"][:2] == rows["2"][:2] == ("skipped", 16)
    assert reason in rows["0"][2] and reason in rows["2"][2]
    assert (net[0].out_features, net[2].out_features) == (16, 16)
    with pytest.raises(TransformSkipError, match=r"2\.weight hold NaN/Inf values"):
        prune_channels_(net, ChannelPruneConfig(ratio=0.5), x, strict=True)


def test_include_glob_that_selects_no_channel_producer_raises() -> None:
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 1))
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(
        ValueError,
        match=r"include pattern\(s\) '1' select no channel-producing conv/linear layer of "
        r"Sequential \(they match only 1 \(BatchNorm2d\)\)",
    ):
        prune_channels_(net, ChannelPruneConfig(ratio=0.5), torch.randn(2, 3, 8, 8), include=["1"])
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
