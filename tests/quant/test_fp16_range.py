"""Values beyond float16's range (65504) are never cast into Inf: kept float32 or refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from slimtorch.quant import LowPrecisionConfig, cast_, export_onnx, set_precision_
from slimtorch.quant.mixed import MixedPrecisionConfig, mixed_precision_


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        net[2].weight[0, 0] = 7e4  # a weight of a dead unit, finite in float32 ...
        net[0].weight[0].zero_()
        net[0].bias[0] = -1.0  # ... (its input is always 0): the outputs stay in range
    return net.eval()


def test_cast_without_check_data_keeps_an_out_of_range_layer_in_float32() -> None:
    # it was reported "cast to fp16", its weight became Inf and every output NaN
    net = _net()
    report = cast_(net, LowPrecisionConfig(dtype="fp16", keep_fp32=()))
    row = next(r for r in report.rows if r.name == "2")
    assert row.dtype == "float32" and "beyond float16's largest value" in row.reason, row
    assert net[2].weight.dtype == torch.float32 and net[0].weight.dtype == torch.float16
    assert torch.isfinite(net(torch.randn(4, 8))).all()


def test_set_precision_refuses_to_make_a_value_inf() -> None:
    net = _net()
    with pytest.raises(ValueError, match=r"'2': weight holds 7e\+04, beyond float16's .* Inf"):
        set_precision_(net, ["0", "2"], torch.float16)
    assert net[0].weight.dtype == torch.float32  # refused before anything was cast
    set_precision_(_net(), ["2"], torch.bfloat16)  # bfloat16 has float32's range


def test_fp16_export_of_a_batch_norm_with_a_large_variance_is_refused(tmp_path: Path) -> None:
    # running_var 1e5 became Inf in the file: a constant output that the CLI's check, which
    # halved its reference the same way, passed
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    with torch.no_grad():
        net[1].running_var.fill_(1e5)
    out = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match=r"fp16 export: 1\.running_var holds 1e\+05"):
        export_onnx(net, out, torch.randn(1, 1, 8, 8), dtype="fp16")
    assert not out.exists()


def test_mixed_precision_does_not_offer_fp16_to_an_out_of_range_layer() -> None:
    net = _net()
    x = torch.randn(64, 8)
    config = MixedPrecisionConfig(candidates=("fp16",), first_last=None, size_ratio=1.2)
    report = mixed_precision_(net, config, x)
    row = next(r for r in report.rows if r.name == "2")
    assert row.choice == "fp32" and "fp16 not offered: weight holds 7e+04" in row.reason, row
    assert torch.isfinite(net(x)).all()
