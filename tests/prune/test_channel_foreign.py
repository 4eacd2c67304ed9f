"""prune_channels_ on forwards outside the zoo's plain shapes: tensor clamp bounds, train-only
branches, exclude= on followers of a group, layer_ratios typos and N:M masks."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.prune import MagnitudeConfig, NMConfig, prune_
from slimtorch.prune.channel import (
    ChannelGraphError,
    ChannelPruneConfig,
    build_graph,
    prune_channels_,
)
from slimtorch.prune.channel.check import forward_outputs
from slimtorch.prune.channel.layers import nm_pattern

CONFIG = ChannelPruneConfig(ratio=0.5, round_to=1)


@torch.no_grad()
def _kill(
    model: nn.Module, x: torch.Tensor, only: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """Zero every weight that writes half the channels of each prunable group (of the groups
    named by their first producer in ``only``): pruning exactly those changes no output.
    Returns the channels each group keeps, by group name."""
    graph = build_graph(model, x)
    gen = torch.Generator().manual_seed(0)
    kept: dict[str, torch.Tensor] = {}
    for g in graph.groups:
        if g.fixed or g.blocked or (only is not None and g.name not in only):
            continue
        keep = torch.sort(torch.randperm(g.size, generator=gen)[: g.size - g.size // 2]).values
        kept[g.name] = keep
        for use in graph.layers.values():
            if g.root not in graph.spaces.roots_of(use.out_space):
                continue
            module = model.get_submodule(use.name)
            dead = torch.ones(module.weight.shape[0], dtype=torch.bool)
            dead[graph.spaces.indices(use.out_space, {g.root: keep})] = False
            module.weight[dead] = 0.0
            if module.bias is not None:
                module.bias[dead] = 0.0
    return kept


def _run(model: nn.Module, x: torch.Tensor, *, training: bool = False) -> object:
    """The output of a copy of ``model`` in train or eval mode (the model itself is untouched)."""
    clone = copy.deepcopy(model).train(training)
    with torch.no_grad():
        return clone(x)


# ---- 1. clamp/clip with tensor bounds ---------------------------------------------------------
BOUNDS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "torch.clamp(min=)": lambda a, b: torch.clamp(a, min=b),
    "torch.clamp(positional)": lambda a, b: torch.clamp(a, b, None),
    ".clamp(max=)": lambda a, b: a.clamp(max=b),
    ".clamp_(min=)": lambda a, b: a.clamp_(min=b),
    "torch.clip(max=)": lambda a, b: torch.clip(a, max=b),
    ".clip(min=, max=)": lambda a, b: a.clip(min=b, max=b + 1.0),
    "torch.maximum": lambda a, b: torch.maximum(a, b),
    ".minimum": lambda a, b: a.minimum(b),
}


class TwoBranchClamp(nn.Module):
    def __init__(self, op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.op = op
        self.a = nn.Conv2d(3, 32, 3, padding=1)
        self.b = nn.Conv2d(3, 32, 3, padding=1)
        self.c = nn.Conv2d(32, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.op(self.a(x), self.b(x))  # a per-element bound from another branch
        return self.fc(F.relu(self.c(h)).mean((2, 3)))


@pytest.mark.parametrize("form", sorted(BOUNDS))
def test_a_tensor_bound_ties_its_channels_to_the_clamped_input(form: str) -> None:
    torch.manual_seed(0)
    model, x = TwoBranchClamp(BOUNDS[form]).eval(), torch.randn(2, 3, 8, 8)
    groups = {g.name: g for g in build_graph(model, x).groups}
    assert groups["a"].producers == ["a", "b"] and not groups["a"].blocked
    _kill(model, x)
    want = _run(model, x)
    report = prune_channels_(model, CONFIG, x)
    assert model.a.out_channels == model.b.out_channels == model.c.in_channels == 16
    assert [r.name for r in report.pruned] == ["a", "c"]
    torch.testing.assert_close(_run(model, x), want, rtol=1e-5, atol=1e-6)


def test_scalar_bounds_keep_clamp_a_one_input_op() -> None:
    x = torch.randn(2, 3, 8, 8)
    lone = TwoBranchClamp(lambda a, b: torch.clamp(a, min=0.0, max=6.0).clamp_(-1.0))
    groups = {g.name: g for g in build_graph(lone, x).groups}
    assert groups["a"].producers == ["a"] and groups["a"].members == ["a", "c"]
    assert not groups["a"].blocked


class ParamFloor(nn.Module):
    def __init__(self, add: bool = False) -> None:
        super().__init__()
        self.add = add
        self.c1 = nn.Conv2d(3, 32, 3, padding=1)
        self.floor = nn.Parameter(torch.rand(1, 32, 1, 1))  # a learnable per-channel floor
        self.c2 = nn.Conv2d(32, 16, 3, padding=1)
        self.c3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c1(x) + self.floor if self.add else torch.clamp(self.c1(x), min=self.floor)
        return self.fc(F.relu(self.c3(F.relu(self.c2(h)))).mean((2, 3)))


def test_a_parameter_bound_skips_its_group_like_a_parameter_operand_of_add() -> None:
    torch.manual_seed(0)
    model, x = ParamFloor().eval(), torch.randn(2, 3, 8, 8)
    _kill(model, x, only=["c2", "c3"])
    want = _run(model, x)
    report = prune_channels_(model, CONFIG, x)
    rows = {r.name: r for r in report.rows}
    assert rows["c1"].action == "skipped" and model.c1.out_channels == 32
    assert "function clamp" in rows["c1"].reason and "parameter" in rows["c1"].reason
    assert rows["c2"].action == "pruned" and model.c2.out_channels == 8
    torch.testing.assert_close(_run(model, x), want, rtol=1e-5, atol=1e-6)
    added = prune_channels_(ParamFloor(add=True).eval(), CONFIG, x).rows[0]
    assert added.action == "skipped"
    assert added.reason.split(" combines ")[1] == rows["c1"].reason.split(" combines ")[1]


UNTRACKED = "combines channels with a tensor the graph does not track (a parameter or constant)"
# a per-channel scale (layer scale) however the forward shapes it: every form that combines the
# conv's channels with values the graph does not track skips the conv's group, naming the op
SCALES: dict[str, Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {
    "gamma (C,1,1)": lambda m, h: h * m.gamma,
    "gamma[:, None, None]": lambda m, h: h * m.gamma[:, None, None],
    "(2 * gamma)[:, None, None]": lambda m, h: h * (2.0 * m.gamma)[:, None, None],
    "gamma.view(1, -1, 1, 1)": lambda m, h: h * m.gamma.view(1, -1, 1, 1),
    "gamma.reshape(-1, 1, 1)": lambda m, h: h * m.gamma.reshape(-1, 1, 1),
    "gamma.unsqueeze(-1).unsqueeze(-1)": lambda m, h: h * m.gamma.unsqueeze(-1).unsqueeze(-1),
    "gamma.expand(C).unsqueeze(1)[..., None]": lambda m, h: (
        h * m.gamma.expand(h.size(1)).unsqueeze(1)[..., None]
    ),
    ".mul(gamma[:, None, None])": lambda m, h: h.mul(m.gamma[:, None, None]),
    "torch.ones(1, C, 1, 1)": lambda m, h: h * torch.ones(1, 16, 1, 1),
    "h.new_ones(1, C, 1, 1)": lambda m, h: h * h.new_ones(1, 16, 1, 1),
    "h.new_full((C, 1, 1), 2.0)": lambda m, h: h + h.new_full((16, 1, 1), 2.0),
}
# the same forms with one value for all channels: they broadcast, so the group stays prunable
BROADCAST: dict[str, Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {
    "gamma[:, None, None] (C=1)": lambda m, h: h * m.gamma[:, None, None],
    "gamma.view(1, -1, 1, 1) (C=1)": lambda m, h: h * m.gamma.view(1, -1, 1, 1),
    "gamma[0] (scalar)": lambda m, h: h * m.gamma[0],
    "2 * torch.ones(1, 1, 1, 1)": lambda m, h: h * (2.0 * torch.ones(1, 1, 1, 1)),
    "h.new_full((1, 1, 1, 1), 2.0)": lambda m, h: h * h.new_full((1, 1, 1, 1), 2.0),
}


class LayerScale(nn.Module):
    def __init__(self, op: Callable[[nn.Module, torch.Tensor], torch.Tensor], *gamma: int) -> None:
        super().__init__()
        self.op = op
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(gamma) + 0.5)
        self.head = nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.op(self, F.relu(self.conv(F.relu(self.stem(x)))))
        return self.fc(F.relu(self.head(h)).mean((2, 3)))


@pytest.mark.parametrize("form", list(SCALES))
def test_a_layer_scale_indexed_or_reshaped_in_forward_skips_its_group_by_name(form: str) -> None:
    torch.manual_seed(0)
    shape = (16, 1, 1) if form == "gamma (C,1,1)" else (16,)
    model, x = LayerScale(SCALES[form], *shape).eval(), torch.randn(2, 3, 8, 8)
    _kill(model, x, only=["stem", "head"])
    want = _run(model, x)
    report = prune_channels_(model, CONFIG, x)
    rows = {r.name: r for r in report.rows}
    assert rows["conv"].action == "skipped" and model.conv.out_channels == 16
    reason = rows["conv"].reason or ""
    assert reason.startswith(("function mul (node 'mul", "method .mul() (node", "function add"))
    assert reason.endswith(UNTRACKED), reason
    assert [r.name for r in report.pruned] == ["stem", "head"]
    assert model.stem.out_channels == model.conv.in_channels == 8 and model.head.out_channels == 16
    torch.testing.assert_close(_run(model, x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", list(BROADCAST))
def test_an_untracked_operand_that_broadcasts_over_channels_blocks_nothing(form: str) -> None:
    torch.manual_seed(0)
    model, x = LayerScale(BROADCAST[form], 1).eval(), torch.randn(2, 3, 8, 8)
    assert not any(g.blocked for g in build_graph(model, x).groups)
    _kill(model, x)
    want = _run(model, x)
    report = prune_channels_(model, CONFIG, x)
    assert [r.name for r in report.pruned] == ["stem", "conv", "head"]
    assert model.conv.out_channels == model.head.in_channels == 8
    torch.testing.assert_close(_run(model, x), want, rtol=1e-5, atol=1e-6)


class OffAxis(nn.Module):
    """Token features (N, T, 16) plus a conv's channels moved onto the last axis (N, 1, 16)."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv1d(3, 16, 1)
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(z) + self.c(x).transpose(1, 2))


def test_a_tracked_operand_with_its_channels_on_another_axis_blocks_the_group() -> None:
    model, x = OffAxis().eval(), (torch.randn(2, 3, 1), torch.randn(2, 5, 8))
    with torch.no_grad():
        want = model(*x)
    rows = {r.name: r for r in prune_channels_(model, CONFIG, x).rows}
    assert rows["a"].action == "skipped" and model.a.out_features == 16
    assert rows["a"].reason == (
        "function add (node 'add') combines channels with a tensor whose channels lie on "
        "another axis"
    )
    assert rows["c"].action == "skipped" and "method .transpose()" in (rows["c"].reason or "")
    with torch.no_grad():
        torch.testing.assert_close(model(*x), want)


# ---- 2. forwards that differ between train and eval mode --------------------------------------
class AuxNet(nn.Module):
    """GoogLeNet style: an auxiliary head on c1's channels, run in training only."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.c2 = nn.Conv2d(32, 32, 3, padding=1)
        self.drop = nn.Dropout(0.0)
        self.aux = nn.Conv2d(32, 10, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.bn1(self.c1(x)))
        out = self.fc(self.drop(F.relu(self.c2(h))).mean((2, 3)))
        if self.training:
            return out, self.aux(h).mean((2, 3))
        return out


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_train_only_branch_is_pruned_with_the_channels_it_reads(mode: str) -> None:
    torch.manual_seed(0)
    model, x = AuxNet().train(mode == "train"), torch.randn(4, 3, 8, 8)
    model.drop.eval()  # mixed flags are put back as they were
    with torch.no_grad():
        model.bn1.running_mean.normal_()
        model.bn1.running_var.uniform_(0.5, 2.0)
    kept = _kill(model, x)
    want_eval, want_train = _run(model, x), _run(model, x, training=True)
    flags = {name: m.training for name, m in model.named_modules()}
    stats = {
        k: v.clone() for k, v in model.bn1.state_dict().items() if "running" in k or "num" in k
    }
    report = prune_channels_(model, CONFIG, x)
    assert [r.name for r in report.pruned] == ["c1", "c2"]
    assert model.aux.in_channels == model.c1.out_channels == model.bn1.num_features == 16
    assert {name: m.training for name, m in model.named_modules()} == flags
    torch.testing.assert_close(_run(model, x), want_eval, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_run(model, x, training=True), want_train, rtol=1e-5, atol=1e-6)
    # the train-mode forward checks left the running statistics alone (only sliced)
    assert torch.equal(model.bn1.running_mean, stats["running_mean"][kept["c1"]])
    assert torch.equal(model.bn1.running_var, stats["running_var"][kept["c1"]])
    assert torch.equal(model.bn1.num_batches_tracked, stats["num_batches_tracked"])


def test_a_train_mode_forward_check_leaves_buffers_rng_and_flags_alone() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5)).eval()
    model[2].train()
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(16, 4)
    rng = torch.get_rng_state()
    (out,) = forward_outputs(model, x, training=True)
    assert bool((out == 0).any())  # dropout ran, in train mode
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model] == [False, False, True] and not model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


class TrainUntraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c1(x)
        if self.training:  # iterating a traced tensor: fx cannot follow this
            h = torch.stack([t for t in h])
        return self.fc(h.mean((2, 3)))


def test_a_train_mode_forward_fx_cannot_trace_is_refused() -> None:
    model, x = TrainUntraceable().eval(), torch.randn(2, 3, 8, 8)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ChannelGraphError, match="in train mode"):
        prune_channels_(model, CONFIG, x)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not model.training


# ---- 3. exclude= on the layers that follow a group -------------------------------------------
class DWNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.bn = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 24, 1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.dw(F.relu(self.stem(x)))))
        return self.fc(F.relu(self.pw(h)).mean((2, 3)))


@pytest.mark.parametrize("excluded", ["bn", "dw", "stem"])
def test_exclude_of_a_batch_norm_or_depthwise_conv_keeps_the_group_whole(excluded: str) -> None:
    torch.manual_seed(0)
    model, x = DWNet().eval(), torch.randn(2, 3, 8, 8)
    _kill(model, x, only=["pw"])
    want = _run(model, x)
    report = prune_channels_(model, CONFIG, x, exclude=[excluded])
    rows = {r.name: r for r in report.rows}
    assert rows["stem"].action == "skipped" and excluded in rows["stem"].reason
    assert model.stem.out_channels == model.dw.out_channels == model.bn.num_features == 16
    assert rows["pw"].action == "pruned" and model.pw.out_channels == 12
    torch.testing.assert_close(_run(model, x), want, rtol=1e-5, atol=1e-6)


def test_exclude_of_a_layer_that_only_reads_a_group_keeps_only_its_own_outputs() -> None:
    torch.manual_seed(0)
    model, x = DWNet().eval(), torch.randn(2, 3, 8, 8)
    _kill(model, x, only=["stem"])
    want = _run(model, x)
    report = prune_channels_(model, CONFIG, x, exclude=["pw"])
    rows = {r.name: r for r in report.rows}
    assert rows["stem"].action == "pruned" and model.pw.in_channels == 8
    assert rows["pw"].action == "skipped" and model.pw.out_channels == 24
    torch.testing.assert_close(_run(model, x), want, rtol=1e-5, atol=1e-6)


# ---- 4. layer_ratios globs --------------------------------------------------------------------
def _seq() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(64 * 4 * 4, 10),
    )  # fmt: skip


@pytest.mark.parametrize(("glob", "says"), [("conv2", "no module at all"), ("1", "1 (ReLU)")])
def test_a_layer_ratios_glob_that_selects_no_layer_raises(glob: str, says: str) -> None:
    model, x = _seq(), torch.randn(2, 3, 8, 8)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"layer_ratios pattern\(s\) '" + glob) as info:
        prune_channels_(model, ChannelPruneConfig(ratio=0.75, layer_ratios={glob: 0.1}), x)
    assert says in str(info.value) and "named like 0, 2, 5" in str(info.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    report = prune_channels_(model, ChannelPruneConfig(ratio=0.75, layer_ratios={"2": 0.5}), x)
    assert [(r.name, r.channels_after) for r in report.pruned] == [("0", 16), ("2", 32)]


# ---- 5. N:M masks -----------------------------------------------------------------------------
def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)
    ).eval()


def test_channel_pruning_that_would_break_nm_masks_is_refused() -> None:
    model, x = _mlp(), torch.randn(4, 32)
    prune_(model, NMConfig(n=2, m=4))
    before = copy.deepcopy(model.state_dict())
    want = _run(model, x)
    with pytest.raises(ValueError, match=r"N:M weight masks of '2' \(2:4\), '4' \(2:4\)") as info:
        prune_channels_(model, CONFIG, x)
    assert "channel-prune first and apply N:M after" in str(info.value)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    torch.testing.assert_close(_run(model, x), want)


def test_nm_masks_whose_input_stays_whole_are_kept_valid() -> None:
    model, x = _mlp(), torch.randn(4, 32)
    prune_(model, NMConfig(n=2, m=4), include=["0"])  # only layer 0: its input is the model's
    _kill(model, x, only=["0"])
    want = _run(model, x)
    report = prune_channels_(model, CONFIG, x, include=["0"])
    assert [r.name for r in report.pruned] == ["0"] and model[0].out_features == 32
    assert nm_pattern(model[0].weight_mask) == (2, 4)
    torch.testing.assert_close(_run(model, x), want, rtol=1e-5, atol=1e-6)


def test_nm_pattern_tells_nm_masks_from_unstructured_ones() -> None:
    torch.manual_seed(0)
    nm, mag = nn.Linear(64, 16), nn.Linear(64, 16)
    prune_(nn.Sequential(nm), NMConfig(n=1, m=4))
    prune_(nn.Sequential(mag), MagnitudeConfig(sparsity=0.5))
    assert nm_pattern(nm.weight_mask) == (1, 4)
    assert nm_pattern(mag.weight_mask) is None
    assert nm_pattern(torch.ones(4, 8, dtype=torch.bool)) is None


# ---- 6. submodules fx cannot trace ------------------------------------------------------------
def test_a_tt_layer_blocks_only_the_channels_flowing_into_it() -> None:
    # a model decomposed with TT (its forward loops over a ParameterList) could not be traced,
    # so channel pruning failed on the whole model without naming the layer
    from slimtorch.decompose import TTConfig, decompose_

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(16 * 8 * 8, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip
    decompose_(model, TTConfig(rank=8), include=["5"])
    x = torch.randn(4, 1, 8, 8)
    report = prune_channels_(model, CONFIG, x)
    rows = {r.name: r for r in report.rows}
    assert rows["3"].action == "skipped" and "TTLinear module '5'" in rows["3"].reason
    assert rows["0"].action == "pruned" and model[0].out_channels == 8
    assert model(x).shape == (4, 10)


class _Gate(nn.Module):
    """A block whose forward branches on values: fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if x.mean() > -1e9 else x


class _WithGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.gate = _Gate()
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.c3 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c2(self.gate(torch.relu(self.c1(x)))))
        return self.fc(torch.relu(self.c3(h)).mean((2, 3)))


def test_a_submodule_fx_cannot_trace_is_kept_whole_and_the_rest_pruned() -> None:
    model, x = _WithGate().eval(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
    report = prune_channels_(model, CONFIG, x)
    rows = {r.name: r for r in report.rows}
    assert rows["c1"].action == "skipped" and "_Gate module 'gate'" in rows["c1"].reason
    assert rows["gate.conv"].action == "skipped"  # inside the opaque call: never sliced
    assert "not a layer of the traced graph" in str(rows["gate.conv"].reason)
    assert model.gate.conv.weight.shape == (16, 16, 3, 3)
    assert rows["c2"].action == "pruned" and model.c2.out_channels == 16
    assert model(x).shape == before.shape


def test_a_root_forward_fx_cannot_trace_is_still_refused() -> None:
    with pytest.raises(ChannelGraphError, match=r"torch\.fx cannot trace _Gate"):
        prune_channels_(_Gate(), CONFIG, torch.randn(1, 16, 4, 4))


def test_a_float64_model_from_load_model_is_pruned(tmp_path: Path) -> None:
    # load_model gives such a model a pre-hook casting float32 inputs; the traced copy the
    # shape pass ran had none, so every float64 model directory failed "on example_input"
    from slimtorch.models import create_model, load_model, save_model

    torch.manual_seed(0)
    net = create_model("lenet5", in_channels=1, input_size=28).double()
    save_model(net, tmp_path / "m", input_shape=(1, 28, 28), mean=[0.0], std=[1.0],
               class_names=list("0123456789"))  # fmt: skip
    model, _ = load_model(tmp_path / "m")
    x = torch.randn(4, 1, 28, 28)
    report = prune_channels_(model, ChannelPruneConfig(ratio=0.5), x)
    assert "pruned" in {r.action for r in report.rows}
    assert model(x).dtype == torch.float64 and model(x).shape == (4, 10)


class _PoolOverFeatures(nn.Module):
    """A 1-d pool on (N, C) features pools over C itself."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 32), nn.Linear(16, 3)
        self.pool = nn.AdaptiveAvgPool1d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.pool(F.relu(self.fc1(x))))


class _MeanBehindMT(nn.Module):
    """A channel mean behind ``.mT``; ``y.mean(1)`` itself is blocked."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c1(x).flatten(2).mT.mean(-1)


@pytest.mark.parametrize(
    ("model", "x", "layer", "reason"),
    [
        (_PoolOverFeatures, torch.randn(4, 12), "fc1", "AdaptiveAvgPool1d module 'pool' pools "
         "over the channel axis (input (4, 32))"),
        (_MeanBehindMT, torch.randn(2, 3, 8, 8), "c1", "channels flow into the attribute .mT"),
    ],
)  # fmt: skip
def test_ops_that_move_the_channel_axis_block_its_group(
    model: Callable[[], nn.Module], x: torch.Tensor, layer: str, reason: str
) -> None:
    # the pool was taken as keeping channels and .mT (any tensor attribute) as a constant: both
    # groups were pruned, and the outputs changed (all of them doubled behind .mT)
    torch.manual_seed(0)
    net = model().eval()
    ref = net(x)
    report = prune_channels_(net, CONFIG, x)
    row = next(r for r in report.rows if r.name == layer)
    assert row.action == "skipped" and reason in (row.reason or "")
    torch.testing.assert_close(net(x), ref)


def test_a_sequential_holding_an_untraceable_layer_keeps_its_other_layers_open() -> None:
    # the whole Sequential became one opaque call: its plain Linear got no row and was never
    # pruned, and strict=True passed; layers the graph cannot see now get a skipped row
    from slimtorch.core.errors import TransformSkipError

    class Loop(nn.Module):  # fx cannot trace a loop over a tensor's values
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for _ in range(int(x.abs().sum() > 0)):
                x = self.lin(x)
            return x

    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(8, 16), Loop(), nn.Linear(16, 32), nn.ReLU())
    model = nn.Sequential(inner, nn.Linear(32, 4))
    x = torch.randn(4, 8)
    with torch.no_grad():
        before = model(x)
    with pytest.raises(TransformSkipError, match=r"0\.1\.lin: Linear is not a layer"):
        prune_channels_(model, CONFIG, x, strict=True)
    report = prune_channels_(model, CONFIG, x)
    rows = {r.name: r.action for r in report.rows}
    assert rows["0.2"] == "pruned" and inner[2].out_features == 16
    assert rows["0.1.lin"] == "skipped" and model(x).shape == before.shape


def test_a_layer_the_forward_never_calls_gets_no_skip_row() -> None:
    # a spare layer (a head used elsewhere) made strict=True fail with "not a layer of the
    # traced graph"
    class WithSpare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 4)
            self.spare = nn.Linear(32, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.fc1(x)))

    model = WithSpare().eval()
    report = prune_channels_(model, CONFIG, torch.randn(4, 8), strict=True)
    assert "spare" not in {r.name for r in report.rows}
