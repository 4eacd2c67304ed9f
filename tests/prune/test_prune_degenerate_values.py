"""NaN/Inf in calibration data, batch-norm statistics and weights: refused or skipped with the
reason, never pruned silently with arbitrary results."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slimtorch.core.errors import TransformSkipError
from slimtorch.prune import MagnitudeConfig, NMConfig, get_mask, prune_
from slimtorch.prune.channel import (
    ChannelPruneConfig,
    build_graph,
    channel_scores,
    prune_channels_,
)
from slimtorch.prune.channel import transform as channel_transform
from slimtorch.quant import CalibrationError


def _conv_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    ).eval()


def _conv_net_with(buffer: str, bad: str) -> nn.Sequential:
    net = _conv_net()
    with torch.no_grad():
        getattr(net[1], buffer)[2] = float(bad)
    return net


def _batches() -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")  # one corrupt sample in the second batch
    return x, [(x, y), (bad, y)]


def _same(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(
        now[k].shape == v.shape and bool(((now[k] == v) | (now[k].isnan() & v.isnan())).all())
        for k, v in state.items()
    )


def test_taylor_refuses_a_calibration_batch_with_a_nan_loss_naming_it() -> None:
    x, calib = _batches()
    net = _conv_net()
    state = copy.deepcopy(net.state_dict())
    cfg = ChannelPruneConfig(ratio=0.5, importance="taylor", round_to=1)
    with pytest.raises(CalibrationError, match=r"calibration batch 1 gives a NaN/Inf loss"):
        prune_channels_(net, cfg, x, calibration=calib)
    assert _same(net, state) and net[0].out_channels == 16 and net[3].out_channels == 16
    assert all(p.requires_grad for p in net.parameters())
    graph = build_graph(net, x)
    with pytest.raises(CalibrationError, match=r"calibration batch 1 .*'l1', 'l2' or 'bn_scale'"):
        channel_scores(net, graph, graph.groups[:1], "taylor", calibration=calib)
    # the clean batch alone still prunes
    report = prune_channels_(net, cfg, x, calibration=calib[:1])
    assert report.rows[0].action == "pruned" and net[0].out_channels == 8


def test_taylor_refuses_nan_gradients_naming_the_batch_and_layer() -> None:
    x, calib = _batches()

    def loss_fn(out: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        # a finite loss whose gradient is NaN (0 * inf through the unselected branch)
        return torch.where(torch.tensor(True), out.sum(), out.sum() * float("inf"))

    net = _conv_net()
    state = copy.deepcopy(net.state_dict())
    cfg = ChannelPruneConfig(ratio=0.5, importance="taylor", round_to=1)
    with pytest.raises(CalibrationError, match=r"batch 0 gives NaN/Inf gradients in layer 0,"):
        prune_channels_(net, cfg, x, calibration=calib[:1], loss_fn=loss_fn)
    assert _same(net, state) and net[0].out_channels == 16


def test_non_finite_scores_are_refused_where_the_plan_is_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = channel_transform.channel_scores

    def nan_scores(*args, **kwargs):
        out = real(*args, **kwargs)
        return {r: (torch.full_like(s, float("nan")), used) for r, (s, used) in out.items()}

    monkeypatch.setattr(channel_transform, "channel_scores", nan_scores)
    x, _ = _batches()
    for scope in ("local", "global"):
        net = _conv_net()
        state = copy.deepcopy(net.state_dict())
        with pytest.raises(CalibrationError, match=r"'l1' gave NaN/Inf scores for group '0' \("):
            prune_channels_(net, ChannelPruneConfig(ratio=0.5, scope=scope, round_to=1), x)
        assert _same(net, state) and net[0].out_channels == 16


@pytest.mark.parametrize(("buffer", "bad"), [("running_var", "nan"), ("running_mean", "inf")])
@pytest.mark.parametrize("importance", ["l1", "bn_scale"])
def test_groups_with_non_finite_batch_norm_statistics_are_skipped(
    buffer: str, bad: str, importance: str
) -> None:
    x, _ = _batches()
    net = _conv_net_with(buffer, bad)
    state = copy.deepcopy(net.state_dict())
    cfg = ChannelPruneConfig(ratio=0.5, importance=importance, round_to=1)
    report = prune_channels_(net, cfg, x)
    row = report.rows[0]
    assert (row.action, row.channels_after) == ("skipped", 16)
    assert f"1.{buffer} hold NaN/Inf values" in row.reason
    assert _same(net[:2], {k: v for k, v in state.items() if k.startswith(("0.", "1."))})
    assert net[0].out_channels == 16
    assert report.rows[1].action == "pruned" and net[3].out_channels == 8  # the other group
    with pytest.raises(TransformSkipError, match=rf"1\.{buffer} hold NaN/Inf values"):
        prune_channels_(_conv_net_with(buffer, bad), cfg, x, strict=True)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def _mlp_with(bad: float) -> nn.Sequential:
    net = _mlp()
    with torch.no_grad():
        net[2].weight[0, 0] = bad
    return net


@pytest.mark.parametrize(
    "config",
    [MagnitudeConfig(sparsity=0.5), MagnitudeConfig(sparsity=0.5, scope="global"), NMConfig()],
)
@pytest.mark.parametrize(("bad", "word"), [(float("inf"), "Inf"), (-float("inf"), "Inf"),
                                           (float("nan"), "NaN")])  # fmt: skip
def test_prune_skips_layers_with_inf_weights_like_nan(config, bad: float, word: str) -> None:
    net = _mlp_with(bad)
    report = prune_(net, config)
    rows = {r.name: r for r in report.rows}
    assert rows["2"].action == "skipped"
    assert rows["2"].reason == f"weight holds {word} values"
    assert get_mask(net[2]) is None and get_mask(net[0]) is not None
    with pytest.raises(TransformSkipError, match=rf"2: weight holds {word} values"):
        prune_(_mlp_with(bad), config, strict=True)
