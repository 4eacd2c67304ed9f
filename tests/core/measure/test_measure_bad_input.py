"""Bad input to the measurement functions: clear errors instead of torch's or wrong numbers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from slimtorch.core.measure import (
    estimate_latency,
    measure_latency,
    measure_peak_memory,
    profile_model,
)
from slimtorch.core.measure.latency import summarize
from slimtorch.core.profiles import get_profile

_FAST = {"device": "cpu", "warmup": 0, "repeats": 1, "min_time_s": 0}


@pytest.mark.parametrize("value", [True, math.inf, math.nan, "0"])
def test_latency_min_time_must_be_a_finite_number(value: object) -> None:
    with pytest.raises(
        ValueError, match=rf"min_time_s must be a number >= 0 and finite, got {value!r}"
    ):
        measure_latency(lambda: None, min_time_s=value)  # type: ignore[arg-type]


def test_latency_device_errors_are_value_and_type_errors() -> None:
    with pytest.raises(ValueError, match=r"device must be like 'cpu'.*got 'gpu0'"):
        measure_latency(lambda: None, device="gpu0", min_time_s=0)
    with pytest.raises(TypeError, match=r"device must be a str or torch.device, got int"):
        measure_latency(lambda: None, device=0, min_time_s=0)  # type: ignore[arg-type]


def test_nothing_is_timed_or_measured_on_the_meta_device() -> None:
    with torch.device("meta"):
        model = nn.Linear(4, 2)
    calls: list[int] = []
    with pytest.raises(ValueError, match=r"cannot time on the meta device"):
        measure_latency(model, torch.randn(3, 4), min_time_s=0)  # inferred from the model
    with pytest.raises(ValueError, match=r"cannot time on the meta device"):
        measure_latency(lambda: calls.append(1), device="meta", min_time_s=0)
    with pytest.raises(ValueError, match=r"cannot measure memory on the meta device"):
        measure_peak_memory(lambda: calls.append(1), device="meta")
    with pytest.raises(ValueError, match=r"device must be like 'cpu'.*got 'gpu0'"):
        measure_peak_memory(lambda: calls.append(1), device="gpu0")
    with pytest.raises(ValueError, match=r"model has 2 tensor\(s\) on the meta device.*'weight'"):
        profile_model(model, torch.randn(3, 4), **_FAST)  # type: ignore[arg-type]
    assert calls == []


def test_summarize_refuses_impossible_times() -> None:
    with pytest.raises(
        ValueError, match=r"times must be finite and >= 0 seconds, got \[nan, 1\.0\]"
    ):
        summarize([math.nan, 1.0], "cpu", 1)
    with pytest.raises(ValueError, match=r"times must be finite and >= 0 seconds, got \[-1\.0\]"):
        summarize([-1.0], "cpu", 1)


def test_profile_model_profiles_argument() -> None:
    lin, x = nn.Linear(4, 2), torch.randn(3, 4)
    with pytest.raises(
        TypeError, match=r"profiles must be a list of profile names, got the string"
    ):
        profile_model(lin, x, profiles="rx580", **_FAST)  # type: ignore[arg-type]
    calls: list[int] = []
    lin.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=r"unknown device profile 'nope'"):
        profile_model(lin, x, profiles=["rx580", "nope"], **_FAST)  # type: ignore[arg-type]
    assert calls == []  # refused before any forward pass
    p = profile_model(lin, x, profiles=[get_profile("rx580")], **_FAST)  # type: ignore[arg-type]
    assert list(p.estimates) == ["rx580"]
    assert p.to_table().splitlines()[-1].split()[0] == "rx580"


def test_profile_model_records_shapes_of_dict_and_nested_inputs() -> None:
    class Two(nn.Module):
        def forward(self, a: torch.Tensor, b: tuple[torch.Tensor, int]) -> torch.Tensor:
            return a + b[0]

    p = profile_model(Two(), {"a": torch.ones(2, 3), "b": (torch.ones(2, 3), 1)}, **_FAST)  # type: ignore[arg-type]
    assert p.input_shapes == ((2, 3), (2, 3))


def test_estimate_dtype_must_be_a_storage_dtype() -> None:
    for bad in (torch.bool, torch.int64, torch.complex64):
        with pytest.raises(ValueError, match=rf"dtype must be a floating-point dtype.*got {bad}"):
            estimate_latency(nn.Linear(4, 2), torch.randn(3, 4), "rx580", dtype=bad)
    est = estimate_latency(nn.Linear(4, 2), torch.randn(3, 4), "rx580", dtype=torch.int8)
    assert est.dtype == "int8"


def test_an_empty_batch_is_refused() -> None:
    # estimate_latency gave 10 us (one launch) and count_flops 0 for a batch of zero samples
    from slimtorch.core.measure import count_flops

    for measure in (lambda m, x: estimate_latency(m, x, "rx580"), count_flops):
        with pytest.raises(ValueError, match=r"empty tensor of shape \(0, 2\).*batch >= 1"):
            measure(nn.Linear(2, 3), torch.randn(0, 2))
