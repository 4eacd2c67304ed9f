"""Exact values of the roofline estimate, the latency timer and the CPU profile probes.

Every expected number is worked out by hand in the test (or by plain arithmetic); the probes'
timers are replaced by fixed values so the rates follow from the formulas alone.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import torch
from test_profiles import toy
from torch import nn

from slimtorch.core import profiles
from slimtorch.core.measure import latency
from slimtorch.core.measure.roofline import estimate_latency
from slimtorch.models import create_model
from slimtorch.quant import PTQConfig, quantize_

H100_FP32 = 67e12  # h100-sxm datasheet rates used by the built-in profile
H100_FP16 = 989e12
H100_INT8 = 1979e12


def test_static_int8_conv_feeding_a_quantized_layer_writes_one_byte_per_output() -> None:
    torch.manual_seed(0)
    net = create_model("resnet20", input_size=8).eval()
    quantize_(net, PTQConfig(mode="static"), calibration=[torch.randn(2, 1, 8, 8)] * 2)
    assert net.get_submodule("layer1.0.conv2").roofline_kernel == "int8"
    est = estimate_latency(net, torch.randn(1, 1, 8, 8), "h100-sxm")
    row = next(r for r in est.rows if r.name == "layer1.0.conv2")
    # int8 input 1x16x8x8, int8 weight 16x16x3x3, 16 bias values, int8 output 1x16x8x8
    assert row.bytes == 16 * 8 * 8 + 16 * 16 * 9 + 16 + 16 * 8 * 8  # 4368


def test_dynamic_int8_linear_prices_the_range_pass_at_the_fp32_rate() -> None:
    torch.manual_seed(0)
    mlp = create_model("mlp", in_channels=1, input_size=28).eval()
    quantize_(mlp, PTQConfig(mode="dynamic"))
    est = estimate_latency(mlp, torch.randn(4, 1, 28, 28), "h100-sxm")
    row = next(r for r in est.rows if r.name == "features.1")
    matmul_flops = 2 * 4 * 784 * 256
    n_in = 4 * 784  # the float input's elements, read twice by the amin range pass
    expected = matmul_flops / H100_INT8 + 2 * n_in / H100_FP32
    assert row.compute_s == pytest.approx(expected, rel=1e-12)


def test_elementwise_ops_run_at_the_fp32_rate_even_when_estimating_fp16() -> None:
    est = estimate_latency(nn.ReLU(), torch.randn(1000, 1000), "h100-sxm", dtype=torch.float16)
    # one FLOP per element at the fp32 rate, not the fp16 matmul rate (989e12)
    assert est.rows[0].compute_s == pytest.approx(1e6 / H100_FP32, rel=1e-12)


def test_profile_with_unknown_memory_size_always_fits() -> None:
    est = estimate_latency(nn.Linear(10, 10), torch.randn(2, 10), toy(memory_bytes=0))
    assert est.fits is True
    assert est.fit_note() is None


def test_model_without_kernels_is_not_reported_as_overhead_bound() -> None:
    # no rows: compute, memory and overhead are all 0; ties go to "compute"
    est = estimate_latency(nn.Identity(), torch.randn(2, 10), "rx580")
    assert est.rows == ()
    assert est.bound == "compute"


def test_measure_latency_stops_after_repeats_when_min_time_is_zero(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a frozen clock makes every run take 0 s, so total == min_time_s == 0 after the repeats
    monkeypatch.setattr(latency.time, "perf_counter", lambda: 1.0)
    result = latency.measure_latency(lambda: None, warmup=0, repeats=5, min_time_s=0)
    assert result.repeats == 5


@pytest.fixture
def fixed_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(profiles, "_median_time", lambda fn, budget_s, min_reps=3: 0.5)
    monkeypatch.setattr(profiles, "read_meminfo", lambda: {"MemAvailable": 2**40})
    monkeypatch.setattr(profiles, "_CPU_CACHE", {})


@pytest.mark.usefixtures("fixed_timer")
def test_gemm_rate_counts_two_flops_per_multiply_add() -> None:
    assert profiles._gemm_rate(torch.float32, 64, 0.01) == 2 * 64**3 / 0.5


@pytest.mark.usefixtures("fixed_timer")
def test_copy_bandwidth_counts_bytes_read_and_written() -> None:
    # plenty of memory: the 64 MiB buffer, read once and written once per copy
    assert profiles._copy_bandwidth(0.01) == 2 * 64 * 2**20 / 0.5


@pytest.mark.usefixtures("fixed_timer")
def test_op_overhead_is_the_time_per_call_of_200_adds() -> None:
    assert profiles._op_overhead(0.01) == 0.5 / 200


@pytest.mark.usefixtures("fixed_timer")
def test_refresh_measures_a_new_cpu_profile() -> None:
    first = profiles.measure_cpu_profile(threads=1, seconds=0.02)
    assert profiles.measure_cpu_profile(threads=1, seconds=0.02) is first
    assert profiles.measure_cpu_profile(threads=1, seconds=0.02, refresh=True) is not first


def test_median_time_is_the_median_not_the_fastest(monkeypatch: pytest.MonkeyPatch) -> None:
    # three timed runs of 3, 1 and 2 seconds (the warm-up call is not timed)
    ticks: Iterator[float] = itertools.chain([0.0, 3.0, 10.0, 11.0, 20.0, 22.0])
    monkeypatch.setattr(profiles.time, "perf_counter", lambda: next(ticks))
    assert profiles._median_time(lambda: None, 0.0) == 2.0


def test_negative_memory_size_is_rejected() -> None:
    with pytest.raises(ValueError, match="memory_bytes"):
        toy(memory_bytes=-1)
