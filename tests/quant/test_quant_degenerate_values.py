"""quantize_ skips a layer whose weight or bias holds NaN/Inf, with the reason, in every mode."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slimtorch.core.errors import TransformSkipError
from slimtorch.quant import PTQConfig, quantize_


def _net(tensor: str, bad: float) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    with torch.no_grad():
        getattr(net[2], tensor).view(-1)[0] = bad
    return net


@pytest.mark.parametrize("mode", ["weight_only", "dynamic", "static"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_layer_with_a_non_finite_bias_is_skipped_and_left_as_it_is(mode: str, bad: float) -> None:
    net = _net("bias", bad)
    before = copy.deepcopy(net[2])
    calibration = [torch.randn(8, 16)] if mode == "static" else None
    report = quantize_(net, PTQConfig(mode=mode), calibration)
    rows = {r.name: r for r in report.rows}
    assert rows["2"].action == "skipped"
    assert rows["2"].reason == "bias holds NaN/Inf; fix or re-initialise the layer first"
    assert rows["0"].action == "quantized"
    assert type(net[2]) is nn.Linear and torch.equal(net[2].weight, before.weight)
    assert torch.equal(net[2].bias.isnan(), before.bias.isnan())
    with pytest.raises(TransformSkipError, match=r"1 layer\(s\).*2: bias holds NaN/Inf"):
        quantize_(_net("bias", bad), PTQConfig(mode=mode), calibration, strict=True)


@pytest.mark.parametrize("mode", ["weight_only", "dynamic"])
def test_a_non_finite_weight_is_still_reported_as_the_weight(mode: str) -> None:
    report = quantize_(_net("weight", float("nan")), PTQConfig(mode=mode))
    row = next(r for r in report.rows if r.name == "2")
    assert (row.action, row.reason) == (
        "skipped",
        "weights hold NaN/Inf; fix or re-initialise the layer first",
    )


def test_nan_activations_from_a_broken_weight_name_the_weight() -> None:
    """Calibration sees NaN only downstream of a NaN weight (the input of the next layer): the
    message names the weight too."""
    from slimtorch.quant import MixedPrecisionConfig, PTQConfig, mixed_precision_, quantize_
    from slimtorch.quant.observers import CalibrationError

    def broken() -> nn.Sequential:
        net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        with torch.no_grad():
            net[2].bias[0] = float("nan")
        return net.eval()

    x = torch.randn(16, 8)
    with pytest.raises(CalibrationError, match=r"in 2\.bias$"):
        quantize_(broken(), PTQConfig(mode="static", skip_first=False, skip_last=False), x)
    with pytest.raises(CalibrationError, match=r"in 2\.bias$"):
        mixed_precision_(broken(), MixedPrecisionConfig(size_ratio=2.0), x)
