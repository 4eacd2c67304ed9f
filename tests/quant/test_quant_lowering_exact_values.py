"""Exact values and refusals of precision casts, QAT spike clipping, Q/DQ placement, the GEMM
and direct convolution lowerings and the export helpers."""

from __future__ import annotations

import copy
import types
from typing import Any
from unittest import mock

import pytest
import torch
from torch import nn

from slimtorch.quant import PTQConfig, lower_conv_gemm_, lower_direct_conv_, quantize_
from slimtorch.quant import int8_runtimes as rt
from slimtorch.quant.convert import QDQAct
from slimtorch.quant.direct import DirectConvConfig
from slimtorch.quant.export import export_precision, output_agreement, qdq_activation_kinds
from slimtorch.quant.gemm import GemmConv2d, GemmConvConfig
from slimtorch.quant.placement import place_qdq_
from slimtorch.quant.precision import (
    beyond_range,
    carry_precision_,
    clear_precision_hooks_,
    layer_precisions,
    precision_units,
    set_precision_,
)
from slimtorch.quant.qat import QATCallback, QATConfig, prepare_qat_
from slimtorch.quant.qdq import QDQConv2d


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


# ---------------------------------------------------------------- precision


def test_unit_names_sharing_a_prefix_are_distinct_units() -> None:
    net = nn.Sequential(*[nn.Linear(4, 4) for _ in range(12)])
    # "10" and "11" start with "1" but are units of their own, not parts of "1"
    assert list(precision_units(net)) == [str(i) for i in range(12)]
    set_precision_(net, ["10"], torch.float16)
    assert net[10].weight.dtype == torch.float16
    assert net[1].weight.dtype == torch.float32


def test_fp16_max_is_in_range_and_just_above_is_not() -> None:
    bn = nn.BatchNorm1d(2)
    var = bn.running_var
    assert var is not None
    var.fill_(65504.0)  # float16's largest finite value
    assert beyond_range(bn, torch.float16) is None
    var.fill_(65520.0)  # rounds to inf in float16
    assert beyond_range(bn, torch.float16) is not None


def test_non_finite_buffers_are_not_counted_as_out_of_range() -> None:
    bn = nn.BatchNorm1d(2)
    var = bn.running_var
    assert var is not None
    var[0] = float("inf")
    assert beyond_range(bn, torch.float16) is None


def test_second_cast_of_a_cast_model_is_refused() -> None:
    net = _mlp()
    set_precision_(net, ["0"], torch.float16)
    with pytest.raises(ValueError, match="already has per-layer precision casts"):
        set_precision_(net, ["2"], torch.float16)


def test_replayed_cast_keeps_float32_outputs() -> None:
    from slimtorch.models.transforms import ARCH_TRANSFORMS

    torch.manual_seed(0)
    net = _mlp()
    fresh = copy.deepcopy(net)
    entry = set_precision_(net, ["0", "2"], torch.float16, output_fp32=["2"])
    ARCH_TRANSFORMS.get("quant.lowp")(fresh, entry["params"])
    x = torch.randn(3, 8)
    assert net(x).dtype == torch.float32
    assert fresh(x).dtype == torch.float32


def test_carried_precision_keeps_the_float32_output() -> None:
    net = _mlp()
    set_precision_(net, ["2"], torch.float16, output_fp32=["2"])
    twin = nn.Linear(8, 2).half()
    carry_precision_(net[2], twin)
    assert twin(torch.randn(1, 8)).dtype == torch.float32


def test_cleared_hooks_let_the_model_be_cast_again() -> None:
    net = _mlp()
    set_precision_(net, ["0"], torch.float16)
    for m in net:
        clear_precision_hooks_(m)
    net.float()
    assert layer_precisions(net) == {}
    set_precision_(net, ["2"], torch.float16)
    assert net[2].weight.dtype == torch.float16


def test_recorded_low_units_are_deduplicated_in_model_order() -> None:
    entry = set_precision_(_mlp(), ["2", "0", "0"], torch.float16)
    assert entry["params"]["low"] == ["0", "2"]


# ---------------------------------------------------------------- QAT


def _spike_run(grads: list[float]) -> tuple[QATCallback, float]:
    """Feed one-weight gradients through the callback; its counters and the last gradient."""
    net = nn.Linear(1, 1, bias=False)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    trainer = types.SimpleNamespace(
        config=types.SimpleNamespace(grad_clip_norm=None), unwrapped_model=net
    )
    cb = QATCallback(QATConfig())
    for v in grads:
        net.weight.grad = torch.full((1, 1), v)
        cb.on_before_optimizer_step(trainer, opt)
    assert net.weight.grad is not None
    return cb, float(net.weight.grad)


def test_spike_right_after_warmup_is_clipped_to_three_times_the_median() -> None:
    cb, grad = _spike_run([1.0] * 10 + [100.0])
    assert cb.clipped == 1
    # spike_clip 3.0 x median(1.0, ..., 1.0)
    assert grad == pytest.approx(3.0)


def test_non_finite_norms_are_neither_clipped_nor_recorded() -> None:
    cb, grad = _spike_run([1.0] * 10 + [float("inf")] * 6 + [100.0])
    assert cb.clipped == 1
    assert all(n == 1.0 for n in list(cb.norms)[:-1])
    assert list(cb.norms)[-1] == 100.0
    assert grad == pytest.approx(3.0)


def test_layer_with_nan_weights_is_skipped_by_qat() -> None:
    last = nn.Linear(4, 2)
    with torch.no_grad():
        last.weight[0, 0] = float("nan")
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), last)
    report = prepare_qat_(net, QATConfig())
    assert "2" in report.skipped
    assert type(net[2]) is nn.Linear


def test_reflect_padded_conv_is_skipped_by_qat() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")).eval()
    report = prepare_qat_(net, QATConfig(act_bits=None))
    assert report.layers == []
    assert "0" in report.skipped
    assert type(net[0]) is nn.Conv2d


def test_callback_state_round_trip_keeps_the_norms() -> None:
    a = QATCallback(QATConfig())
    a.norms.extend([1.0] * 11 + [2.0])
    a.clipped = 2
    b = QATCallback(QATConfig())
    b.load_state_dict(a.state_dict())
    assert list(b.norms) == [1.0] * 11 + [2.0]
    assert b.clipped == 2


# ---------------------------------------------------------------- placement


def _placed(symmetric: bool) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)
    ).eval()
    net.slimtorch_arch = {"name": "demo", "transforms": []}  # type: ignore[assignment]
    calib = [torch.randn(4, 3, 9, 9)]
    quantize_(net, PTQConfig(mode="static", symmetric=symmetric), calibration=calib)
    place_qdq_(net, "onnxruntime", calibration=calib)
    return net


@pytest.mark.filterwarnings("ignore")
def test_symmetric_placement_gives_int8_activation_with_zero_point_zero() -> None:
    act = _placed(symmetric=True)[1]
    assert isinstance(act, QDQAct)
    spec = act.spec()
    assert spec["dtype"] == "int8"
    assert spec["zero_point"] == 0


@pytest.mark.filterwarnings("ignore")
def test_placed_activation_is_recorded() -> None:
    net = _placed(symmetric=False)
    arch: Any = net.slimtorch_arch
    acts = [e["params"].get("activations") for e in arch["transforms"]]
    act = net[1]
    assert isinstance(act, QDQAct)
    assert acts[-1] is not None
    assert acts[-1]["1"] == act.spec()


@pytest.mark.filterwarnings("ignore")
def test_weight_only_conv_output_is_not_quantized_for_onnxruntime() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2),
    ).eval()  # fmt: skip
    calib = [torch.randn(4, 4, 9, 9)]
    quantize_(net, PTQConfig(mode="static"), calibration=calib)
    conv2 = net[2]
    assert isinstance(conv2, QDQConv2d)
    conv2.input_scale = None  # conv 2 made weight-only: it reads float, runs no QLinearConv
    changes = place_qdq_(net, "onnxruntime", calibration=calib).changes
    assert list(changes) == ["1"]


# ---------------------------------------------------------------- GEMM / direct lowering


@pytest.mark.filterwarnings("ignore")
def test_compiled_path_pads_with_the_input_zero_point() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1)).eval()
    lower_conv_gemm_(net)
    x = torch.randn(4, 8, 6, 6) + 1.0  # shifted: the asymmetric input zero point is not 0
    quantize_(net, PTQConfig(mode="static"), calibration=[x])
    gemm: Any = net[0]
    assert gemm.linear.input_zero_point != 0
    with torch.no_grad():
        eager = net(x)
        with mock.patch("torch.compiler.is_compiling", return_value=True):
            compiled_branch = net(x)
    torch.testing.assert_close(compiled_branch, eager, atol=1e-5, rtol=0)


def test_gemm_lowering_without_fold_bn_keeps_the_batch_norm() -> None:
    net = nn.Sequential(nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16)).eval()
    report = lower_conv_gemm_(net, GemmConvConfig(fold_bn=False))
    assert report.folded == []
    assert type(net[1]) is nn.BatchNorm2d


def test_direct_lowering_without_fold_bn_keeps_the_batch_norm() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)).eval()
    report = lower_direct_conv_(net, DirectConvConfig(fold_bn=False))
    assert report.folded == []
    assert type(net[1]) is nn.BatchNorm2d


def test_gemm_lowering_skips_nan_weights() -> None:
    conv = nn.Conv2d(8, 16, 3)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = float("nan")
    net = nn.Sequential(conv).eval()
    rows = lower_conv_gemm_(net).rows
    assert rows[0].action == "skipped"
    assert "NaN/Inf" in (rows[0].reason or "")
    assert type(net[0]) is nn.Conv2d


def test_gemm_conv_refuses_an_input_too_narrow_for_the_kernel() -> None:
    g = GemmConv2d.from_conv(nn.Conv2d(2, 4, 3))
    # 8x2 input, 3x3 kernel: 6 rows but 0 columns of output
    with pytest.raises(ValueError, match="too small"):
        g(torch.randn(1, 2, 8, 2))


def test_conv_with_exactly_max_taps_is_lowered_and_fused() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)).eval()
    rows = lower_direct_conv_(net).rows
    assert rows[0].taps == 3 * 3 * 3  # the default max_taps
    assert rows[0].action == "direct+pool"


def _lowered_vs_ref(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ref = copy.deepcopy(net)
    lower_direct_conv_(net)
    with torch.no_grad():
        return net(x), ref(x)


def test_ceil_mode_pool_keeps_its_output_shape_after_direct_lowering() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)).eval()
    got, want = _lowered_vs_ref(net, torch.randn(1, 1, 9, 9))
    assert want.shape == (1, 4, 4, 4)  # 7x7 conv output, ceil(7 / 2) = 4
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_overlapping_pool_keeps_its_output_after_direct_lowering() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2, stride=1)).eval()
    got, want = _lowered_vs_ref(net, torch.randn(1, 1, 9, 9))
    assert want.shape == (1, 4, 6, 6)  # 7x7 conv output, (7 - 2) / 1 + 1 = 6
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


class _ConvOutputReadTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.pool(self.relu(y)).flatten(1).sum(1) + y.flatten(1).sum(1)


def test_conv_output_read_elsewhere_is_not_fused_with_its_pool() -> None:
    torch.manual_seed(0)
    net = _ConvOutputReadTwice().eval()
    ref = copy.deepcopy(net)
    x = torch.randn(2, 1, 10, 10)
    rows = lower_direct_conv_(net).rows
    assert rows[0].fused == []
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------- export helpers


def test_export_precision_counts_the_cast_layers() -> None:
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    set_precision_(net, ["0", "2"], torch.float16)
    assert "float16 in 2 of 3 layers" in export_precision(net)


def test_single_column_outputs_have_no_top1_agreement() -> None:
    out = output_agreement(torch.tensor([[1.0], [2.0]]), torch.tensor([[1.5], [2.0]]))
    assert out == {"max_abs_diff": 0.5}


def test_max_abs_diff_is_absolute() -> None:
    out = output_agreement(torch.tensor([[0.0, 1.0]]), torch.tensor([[5.0, 1.0]]))
    assert out["max_abs_diff"] == 5.0  # |0 - 5|


def _dynamic_mlp() -> nn.Sequential:
    net = _mlp().eval()
    quantize_(net, PTQConfig(mode="dynamic"))
    return net


def test_dynamic_layers_are_counted_as_dynamic() -> None:
    assert qdq_activation_kinds(_dynamic_mlp()) == {"dynamic": 2}


def test_dynamic_model_quantizes_its_inputs() -> None:
    assert rt._quantizes_inputs(_dynamic_mlp()) is True


def test_mean_without_keepdims_is_not_rewritten() -> None:
    from onnx import TensorProto, helper

    from slimtorch.quant.ort_graph import ort_rewrites

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])
    node = helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="mean", keepdims=0)
    graph = helper.make_graph([node], "g", [x], [y], [axes])
    proto = helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 18)])
    assert ort_rewrites(proto) == []
