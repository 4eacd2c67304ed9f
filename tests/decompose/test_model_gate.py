"""The whole-model speed gate: backward elimination on timings of the whole model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slimtorch.decompose import LowRankLinear, SVDConfig, TuckerConfig, decompose_
from slimtorch.decompose import model_gate as gate_mod
from slimtorch.decompose.speed import SpeedCheck

# A made-up cost model: each layer costs this much dense, and that much factorised. Layer "2"
# is slower factorised; the others are faster.
DENSE = {"0": 10.0, "2": 10.0, "4": 10.0}
FACTORISED = {"0": 4.0, "2": 12.0, "4": 9.0}


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256)
    ).eval()


def _cost(model: nn.Module) -> float:
    return sum(
        FACTORISED[n] if isinstance(model.get_submodule(n), LowRankLinear) else DENSE[n]
        for n in DENSE
    )


@pytest.fixture
def timings(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, float, tuple[int, ...]]]:
    calls: list[tuple[float, float, tuple[int, ...]]] = []

    def fake(original: nn.Module, factorised: nn.Module, shape: tuple[int, ...], **_: object):
        a, b = _cost(original), _cost(factorised)
        calls.append((a, b, tuple(shape)))
        return SpeedCheck(a, b, a / b, "measured:cpu")

    monkeypatch.setattr(gate_mod, "layer_speedup", fake)
    return calls


def test_reverts_exactly_the_layer_the_model_is_slower_with(timings: list) -> None:
    net = _net()
    original = copy.deepcopy(net)
    cfg = SVDConfig(rank=0.25, min_speedup=1.0, speed_scope="model", speed_batch=(1, 8))
    report = decompose_(net, cfg, example_input=torch.randn(4, 256))
    rows = {r.name: r for r in report.rows}
    kinds = [type(net[i]).__name__ for i in (0, 2, 4)]
    assert kinds == ["LowRankLinear", "Linear", "LowRankLinear"]
    assert rows["2"].action == "skipped" and "whole model not faster" in (rows["2"].reason or "")
    assert rows["2"].params_after == rows["2"].params_before and rows["2"].ranks is None
    assert rows["2"].info["tried_ranks"] == [64]
    torch.testing.assert_close(net[2].weight, original[2].weight)  # the original is back
    # whole-model times on the rows: without / with the layer factorised
    assert rows["0"].action == "decomposed" and rows["0"].speed_source == "measured-model:cpu"
    assert rows["0"].latency_before_s is not None and rows["0"].speedup is not None
    assert rows["0"].speedup > 1.0
    # only the kept layers are recorded for reloading
    assert report.entry is not None and sorted(report.entry["params"]["layers"]) == ["0", "4"]
    # every speed batch was timed for every candidate
    assert {t[2] for t in timings} == {(1, 256), (8, 256)} and len(timings) == 3 * 2


def test_fewest_flops_saved_go_first_and_later_checks_see_earlier_reverts(timings: list) -> None:
    net = _net()
    report = decompose_(
        net,
        SVDConfig(rank=0.25, min_speedup=1.0, speed_scope="model"),
        example_input=torch.randn(2, 256),
    )
    assert all(r.flops_before == report.rows[0].flops_before for r in report.rows)
    # equal savings keep the layer order: "0" first (kept), then "2" (reverted), then "4", timed
    # against a model in which "2" is dense again
    # without "0": 10+12+9 (kept); without "2": 4+10+9 (reverted); without "4": 4+10+10
    assert [a for a, _, _ in timings] == [31.0, 23.0, 24.0]  # the model without the layer
    assert [b for _, b, _ in timings] == [25.0, 25.0, 23.0]  # the model with it


def test_min_speedup_above_every_gain_reverts_everything(timings: list) -> None:
    net = _net()
    before = copy.deepcopy(net)
    report = decompose_(
        net,
        SVDConfig(rank=0.25, min_speedup=5.0, speed_scope="model"),
        example_input=torch.randn(2, 256),
    )
    assert [r.action for r in report.rows] == ["skipped"] * 3
    assert report.entry is None
    x = torch.randn(3, 256)
    torch.testing.assert_close(net(x), before(x))


def test_real_timing_runs_on_cpu() -> None:
    net = _net()
    report = decompose_(
        net,
        SVDConfig(rank=0.25, min_speedup=0.01, speed_scope="model"),  # any gain keeps it
        example_input=torch.randn(8, 256),
    )
    assert [r.action for r in report.rows] == ["decomposed"] * 3
    assert all(r.speedup is not None and r.speedup > 0.01 for r in report.rows)


def test_config_and_input_errors() -> None:
    with pytest.raises(ValueError, match="speed_scope must be one of 'layer', 'model'"):
        SVDConfig(speed_scope="graph")
    with pytest.raises(ValueError, match="cannot use a roofline profile"):
        TuckerConfig(min_speedup=1.0, speed_scope="model", speed_on="rx580")
    with pytest.raises(ValueError, match="speed_compile must be True or False"):
        SVDConfig(speed_compile="yes")  # type: ignore[arg-type]
    net = _net()
    cfg = SVDConfig(rank=0.25, min_speedup=1.0, speed_scope="model")
    with pytest.raises(ValueError, match="one input tensor"):
        decompose_(net, cfg, example_input=(torch.randn(2, 256),))
    assert type(net[0]).__name__ == "Linear"  # nothing applied


def test_compiled_timing_on_a_gpu_inductor_cannot_compile_for_is_refused_upfront(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # on a GTX 1060 it failed in torch.compile after every layer had been factorised
    import slimtorch.decompose.model_gate as gate

    monkeypatch.setattr(gate, "compile_problem", lambda d: "a GPU too old for Triton")
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cfg = SVDConfig(rank=0.25, min_speedup=0.01, speed_scope="model", speed_compile=True)
    with pytest.raises(ValueError, match="cannot compile for cpu: a GPU too old for Triton"):
        decompose_(net, cfg, example_input=torch.randn(8, 256))
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert type(net[0]).__name__ == "Linear"


@pytest.mark.slow
def test_compiled_whole_model_timing() -> None:
    net = _net()
    report = decompose_(
        net,
        SVDConfig(rank=0.25, min_speedup=0.01, speed_scope="model", speed_compile=True),
        include=["0"],
        example_input=torch.randn(8, 256),
    )
    assert report.rows[0].action == "decomposed"
    assert report.rows[0].speed_source == "measured-model:cpu,compiled"


def test_the_model_gate_times_channels_last_inputs_when_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # it converted the model but timed NCHW inputs: a layout that is neither the model's nor
    # the deployment's, and its source label dropped ",channels_last"
    import slimtorch.decompose.speed as speed

    seen: set[tuple[bool, bool]] = set()
    real = speed.measure_latency

    def spy(module: nn.Module, x: torch.Tensor, **kw: object) -> object:
        w = next(module.parameters())
        fmt = torch.channels_last
        seen.add((x.is_contiguous(memory_format=fmt), w.is_contiguous(memory_format=fmt)))
        return real(module, x, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(speed, "measure_latency", spy)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
    cfg = TuckerConfig(rank=0.25, min_speedup=0.01, speed_scope="model", speed_channels_last=True)
    report = decompose_(net, cfg, example_input=torch.randn(2, 8, 8, 8))
    assert report.rows[0].speed_source == "measured-model:cpu,channels_last"
    assert seen == {(True, True)}
