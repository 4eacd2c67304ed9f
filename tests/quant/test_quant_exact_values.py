"""Exact values of the quant building blocks: observers, weight quantization, int4 packing, LSQ
gradients, the knapsack, BN folding, Q/DQ layers, PTQ choices and mixed-precision budgets."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from slimtorch.core.errors import ModelLoadError
from slimtorch.quant import LayerQParams, QDQLinear, quantize_weight
from slimtorch.quant.fold import fold_bn_
from slimtorch.quant.int4 import pack_int4, unpack_int4
from slimtorch.quant.knapsack import allocate
from slimtorch.quant.lsq import LSQActQuantizer, LSQWeightQuantizer, lsq_fake_quantize
from slimtorch.quant.mixed import MixedPrecisionConfig, mixed_precision_
from slimtorch.quant.observers import (
    CalibrationError,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
)
from slimtorch.quant.ptq import PTQConfig, quantize_, residual_points

# ---------------------------------------------------------------- observers


def test_affine_uint8_zero_point_rounds_to_nearest() -> None:
    obs = MinMaxObserver(dtype="uint8")
    obs.update(torch.tensor([-0.1, 1.0]))
    scale, zp = obs.qparams()
    assert float(scale) == pytest.approx(1.1 / 255)
    # -lo / scale = 0.1 * 255 / 1.1 = 23.18: nearest integer 23 (not 24)
    assert int(zp) == 23


def test_affine_range_of_positive_values_includes_zero() -> None:
    obs = MinMaxObserver(dtype="uint8")
    obs.update(torch.tensor([1.0, 2.0]))
    scale, zp = obs.qparams()
    assert float(scale) == pytest.approx(2.0 / 255)  # [0, 2], not [1, 2]
    assert int(zp) == 0


def test_per_channel_observer_refuses_a_tensor_without_the_channel_axis() -> None:
    obs = MinMaxObserver(dtype="uint8", per_channel=True, ch_axis=1, name="fc")
    with pytest.raises(CalibrationError, match="per-channel observer on axis 1"):
        obs.update(torch.randn(5))


def test_percentile_range_is_the_mean_of_per_batch_quantiles() -> None:
    obs = PercentileObserver(percentile=90.0, dtype="int8", symmetric=True)
    obs.update(torch.linspace(-1, 1, 101))  # 10th/90th percentiles: -0.8, 0.8
    obs.update(torch.linspace(-3, 3, 101))  # -2.4, 2.4
    lo, hi = obs.range()
    assert float(lo) == pytest.approx((-0.8 - 2.4) / 2, abs=1e-5)
    assert float(hi) == pytest.approx((0.8 + 2.4) / 2, abs=1e-5)


def test_mse_observer_refuses_a_zero_min_shrink() -> None:
    with pytest.raises(ValueError, match="min_shrink"):
        MSEObserver(min_shrink=0.0, dtype="int8", symmetric=True)


def test_mse_observer_never_keeps_more_than_max_samples() -> None:
    torch.manual_seed(0)
    obs = MSEObserver(max_samples=64, dtype="int8", symmetric=True)
    for i in range(8):
        obs.update(torch.randn(1000) * (i + 1))
        assert sum(t.shape[1] for t in obs.samples) <= 64


# ---------------------------------------------------------------- qfunc / int4


def test_affine_weights_use_the_whole_uint8_range() -> None:
    q, scale, zp = quantize_weight(torch.tensor([[0.0, 2.55]]), symmetric=False)
    assert q.tolist() == [[0, 255]]
    assert scale.tolist() == pytest.approx([2.55 / 255])
    assert zp.tolist() == [0]


def test_quantize_weight_refuses_inf() -> None:
    with pytest.raises(ValueError, match="NaN/Inf"):
        quantize_weight(torch.tensor([[float("inf"), 1.0]]))


def test_pack_int4_refuses_eight() -> None:
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([8, 1], dtype=torch.int8))


def test_unpack_int4_refuses_extra_bytes() -> None:
    packed = torch.tensor([0x21, 0x43, 0x65], dtype=torch.uint8)  # 3 bytes for 2 values
    with pytest.raises(ValueError, match="does not match"):
        unpack_int4(packed, (2,))


# ---------------------------------------------------------------- LSQ


def _lsq_step_grad(x: torch.Tensor, s: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """d/ds of round(clamp(x/s)) * s summed over x, by the LSQ paper's formula (g = 1)."""
    xs = x / s
    inside = (xs >= qmin) & (xs <= qmax)
    return torch.where(inside, torch.round(xs) - xs, xs.clamp(qmin, qmax)).sum()


def test_act_quantizer_is_unsigned_when_the_first_batch_has_no_negative_value() -> None:
    a = LSQActQuantizer(8)
    y = a(torch.tensor([0.0, 1.0, 2.0, 300.0]))
    assert not bool(a.signed) and a.qrange == (0, 255)
    step = 2 * (303.0 / 4) / math.sqrt(255)  # 2 mean|x| / sqrt(Q_P)
    assert y.tolist() == pytest.approx([0.0, 0.0, 0.0, round(300.0 / step) * step], rel=1e-5)


def test_weight_step_gradient_is_scaled_by_one_over_sqrt_n_qmax() -> None:
    w = torch.tensor([[0.5, -0.25, 0.125, 1.0]])
    qz = LSQWeightQuantizer(w, bits=8, init="minmax")
    x = w * 1.3  # one value clipped at qmax
    qz(x).sum().backward()
    s = qz.scale().detach().reshape(-1, 1)
    expected = _lsq_step_grad(x, s, -128, 127) / math.sqrt(4 * 127)
    assert qz.step.grad is not None
    assert float(qz.step.grad[0]) == pytest.approx(float(expected), rel=1e-4)


def test_act_step_gradient_counts_the_elements_of_one_sample() -> None:
    a = LSQActQuantizer(8)
    x = torch.arange(1.0, 17.0).reshape(4, 4)  # 4 samples of 4 values, unsigned
    a(x).sum().backward()
    expected = _lsq_step_grad(x, a.scale().detach(), 0, 255) / math.sqrt(4 * 255)
    assert a.step.grad is not None
    assert float(a.step.grad) == pytest.approx(float(expected), rel=1e-4)


def test_no_input_gradient_just_outside_the_clipping_range() -> None:
    # x / s = 127.3 and -128.3 are clipped (they would round back into the range)
    x = (torch.tensor([127.3, 127.6, 50.2, -128.3]) * 0.5).requires_grad_(True)
    s = torch.tensor(0.5, requires_grad=True)
    lsq_fake_quantize(x, s, -128, 127, 1.0).sum().backward()
    assert x.grad is not None
    assert x.grad.tolist() == [0.0, 0.0, 1.0, 0.0]


# ---------------------------------------------------------------- knapsack


def test_allocate_prefers_the_cheaper_option_on_equal_loss() -> None:
    assert allocate({"a": {"x": 0.0, "y": 0.0}}, {"a": {"x": 10.0, "y": 5.0}}, 100.0) == {"a": "y"}


def test_allocate_with_fractional_costs_stays_within_budget() -> None:
    losses = {"a": {"x": 0.0, "y": 1.0}, "b": {"x": 0.0, "y": 1.0}}
    costs = {"a": {"x": 1.5007, "y": 1.0}, "b": {"x": 1.5007, "y": 1.0}}
    plan = allocate(losses, costs, 3.0)  # both "x" cost 3.0014: one layer must take "y"
    assert sum(costs[n][plan[n]] for n in plan) <= 3.0
    assert sum(losses[n][plan[n]] for n in plan) == 1.0
    assert sorted(plan.values()) == ["x", "y"]


def test_allocate_accepts_a_budget_met_exactly() -> None:
    assert allocate({"a": {"x": 0.0}}, {"a": {"x": 5.0}}, 5.0) == {"a": "x"}


# ---------------------------------------------------------------- fold


def _conv_bn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.BatchNorm2d(2)).eval()


def test_fold_skips_a_batch_norm_with_nan_running_var() -> None:
    net = _conv_bn()
    conv, bn = net[0], net[1]
    assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
    assert bn.running_var is not None
    with torch.no_grad():
        bn.running_var[0] = float("nan")
    report = fold_bn_(net)
    assert [r.action for r in report.rows] == ["skipped"]
    assert "NaN/Inf" in (report.rows[0].reason or "")
    assert net[1] is bn  # left in place
    assert torch.isfinite(conv.weight).all()


def test_fold_adds_a_trainable_bias_to_a_bias_free_conv() -> None:
    net = _conv_bn()
    fold_bn_(net)
    assert isinstance(net[1], nn.Identity)
    assert net[0].bias is not None and net[0].bias.requires_grad


# ---------------------------------------------------------------- Q/DQ layers


def _lin(w: list[list[float]]) -> nn.Linear:
    lin = nn.Linear(len(w[0]), len(w), bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(w))
    return lin


def test_dynamic_int8_input_scale_covers_the_negative_side() -> None:
    qp = LayerQParams(weight_scale=torch.tensor([1.0]), input_dtype="int8", input_dynamic=True)
    layer = QDQLinear.from_float(_lin([[0.7, -0.7]]), qp)
    s = 2.0 / 127  # max(|-2|, 0.5) / 127
    out = layer.quantize_input(torch.tensor([-2.0, 0.5]))
    assert out.tolist() == pytest.approx([-127 * s, round(0.5 / s) * s])


def test_load_weight_rounds_to_nearest() -> None:
    layer = QDQLinear.from_float(
        _lin([[0.66, -0.66]]), LayerQParams(weight_scale=torch.tensor([0.1]))
    )
    assert layer.weight_int8.tolist() == [[7, -7]]  # 6.6 rounds to 7, not 6


def test_layer_qparams_refuse_a_zero_weight_scale() -> None:
    with pytest.raises(ValueError, match="weight_scale must be finite and > 0"):
        LayerQParams(weight_scale=torch.tensor([0.0])).check("fc", 1)


def test_layer_qparams_refuse_an_int8_input_with_a_zero_point() -> None:
    qp = LayerQParams(
        weight_scale=torch.tensor([1.0]), input_scale=0.1, input_dtype="int8", input_zero_point=5
    )
    with pytest.raises(ValueError, match="input_zero_point 0"):
        qp.check("fc", 1)


def test_four_bit_layer_with_static_input_has_no_int8_roofline_kernel() -> None:
    qp = LayerQParams(weight_scale=torch.tensor([0.1]), weight_bits=4, input_scale=0.02)
    assert QDQLinear.from_float(_lin([[0.66, -0.66]]), qp).roofline_kernel is None


def test_loading_a_zero_weight_scale_is_refused() -> None:
    layer = QDQLinear(2, 1, bias=False)
    sd = layer.state_dict()
    sd["weight_scale"] = torch.tensor([0.0])
    with pytest.raises(ModelLoadError, match="non-positive"):
        layer.load_state_dict(sd)


# ---------------------------------------------------------------- PTQ


def test_ptq_weights_are_symmetric() -> None:
    net = nn.Sequential(_lin([[-0.1, 1.0]]))
    quantize_(net, PTQConfig(mode="weight_only"))
    layer = net[0]
    assert isinstance(layer, QDQLinear)
    assert layer.weight_scale.tolist() == pytest.approx([1.0 / 127])
    expected = [round(-0.1 * 127) / 127, 1.0]  # zero point 0, max|w| on level 127
    assert layer.dequantized_weight().tolist() == [pytest.approx(expected)]


def test_ptq_int4_weights_use_the_int4_range() -> None:
    net = nn.Sequential(_lin([[-0.5, 0.7]]))
    quantize_(net, PTQConfig(mode="weight_only", weight_bits=4))
    layer = net[0]
    assert isinstance(layer, QDQLinear)
    assert layer.weight_scale.tolist() == pytest.approx([0.7 / 7])  # max|w| / 7
    assert layer.dequantized_weight().tolist() == [pytest.approx([-0.5, 0.7])]


def test_ptq_keeps_a_same_padded_conv_in_float() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding="same"), nn.Flatten(), nn.Linear(128, 3))
    report = quantize_(net, PTQConfig(mode="weight_only"))
    rows = {r.name: (r.action, r.reason or "") for r in report.rows}
    assert rows["0"][0] == "skipped" and "padding='same'" in rows["0"][1]
    assert rows["2"][0] == "quantized"
    assert isinstance(net[0], nn.Conv2d) and type(net[0]) is nn.Conv2d


class _AddReluShared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.relu = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c1(x) + self.c2(x)
        return self.relu(y) * y  # the add's output has a second user


class _AddOfFunctions(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.relu = nn.Conv2d(2, 2, 1), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c1(x)
        return self.relu(torch.sigmoid(x) + x * 2)


def test_relu_after_an_add_with_other_users_is_not_a_residual_activation() -> None:
    outs, acts, note = residual_points(_AddReluShared(), ["c1", "c2"])
    assert (outs, acts, note) == ({"c1", "c2"}, set(), "")


def test_add_fed_only_by_functions_is_not_a_residual_point() -> None:
    assert residual_points(_AddOfFunctions(), ["c1"]) == (set(), set(), "")


# ---------------------------------------------------------------- mixed precision


def _mlp() -> tuple[nn.Sequential, list[torch.Tensor]]:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    ).eval()
    return net, [torch.randn(16, 64) for _ in range(2)]


_FP32_BYTES = 4 * (64 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10)  # 35880


def test_first_last_int8_floor_allows_int8() -> None:
    net, batches = _mlp()
    report = mixed_precision_(net, MixedPrecisionConfig(size_ratio=3.5), batches)
    assert report.size_fp32 == _FP32_BYTES
    assert [r.choice for r in report.rows] == ["int8", "int8", "int8"]
    assert report.size_after <= _FP32_BYTES / 3.5


def test_byte_budget_counts_the_excluded_layers() -> None:
    net, batches = _mlp()
    config = MixedPrecisionConfig(budget_bytes=25000, exclude=("0",))
    report = mixed_precision_(net, config, batches)
    assert report.budget["outside_allocated"] == 4 * (64 * 64 + 64)  # layer 0 stays fp32
    assert report.size_after <= 25000


def test_size_ratio_limit_is_fp32_size_over_ratio() -> None:
    net, batches = _mlp()
    report = mixed_precision_(copy.deepcopy(net), MixedPrecisionConfig(size_ratio=2.0), batches)
    assert report.budget["limit"] == pytest.approx(_FP32_BYTES / 2)
