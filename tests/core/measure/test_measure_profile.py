"""Tests of slimtorch.core.measure.profile: the combined profile and the before/after table."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from slimtorch.core.measure import (
    LatencyResult,
    MemoryResult,
    ModelProfile,
    compare_profiles,
    estimate_latency,
    profile_model,
)


def tiny() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)
    )


def test_profile_model_on_cpu() -> None:
    model = tiny().train()
    x = torch.randn(2, 3, 8, 8)
    p = profile_model(
        model,
        x,
        device="cpu",
        profiles=["rx580", "h100-sxm"],
        threads=1,
        repeats=3,
        min_time_s=0.01,
    )
    # conv: 3*4*9 + 4 = 112; linear: 256*5 + 5 = 1285
    assert (p.params, p.trainable_params) == (1397, 1397)
    assert p.size_bytes == 1397 * 4 and p.storage == {"float32": 5588}
    conv = 2 * (2 * 4 * 64) * 27
    fc = 2 * 2 * 256 * 5
    assert (p.flops, p.macs) == (conv + fc, (conv + fc) // 2)
    assert p.input_shapes == ((2, 3, 8, 8),) and p.device == "cpu" and p.model == "Sequential"
    assert p.latency.repeats >= 3 and p.latency.threads == 1 and p.latency.median_s > 0
    assert p.memory.method in ("rss", "rss-sampled") and p.memory.peak_bytes >= 0
    assert list(p.estimates) == ["rx580", "h100-sxm"]
    expected = estimate_latency(model, x, "rx580").total_s
    assert p.estimates["rx580"].total_s == pytest.approx(expected)
    assert model.training  # flags restored
    data = json.loads(json.dumps(p.to_dict()))
    assert (
        data["flops"] == conv + fc and data["estimates"]["rx580"]["kernels"] == 3
    )  # conv, relu, addmm
    table = p.to_table()
    assert "params       : 1,397" in table
    assert f"GFLOPs       : {(conv + fc) / 1e9:.4f}" in table
    assert "latency here" in table and "peak memory" in table
    assert table.splitlines()[-2].startswith("rx580")


def fake_profile(params: int, latency_ms: float, est_ms: dict[str, float]) -> ModelProfile:
    from slimtorch.core.measure import RooflineEstimate

    lat = LatencyResult(
        latency_ms / 1e3,
        latency_ms / 1e3,
        0.0,
        latency_ms / 1e3,
        latency_ms / 1e3,
        latency_ms / 1e3,
        10,
        "cpu",
        1,
    )
    return ModelProfile(
        model="M",
        input_shapes=((1, 3),),
        device="cpu",
        params=params,
        trainable_params=params,
        size_bytes=4 * params,
        storage={"float32": 4 * params},
        flops=2 * params,
        macs=params,
        latency=lat,
        memory=MemoryResult(0, 1, "rss", "cpu"),
        estimates={k: RooflineEstimate(k, None, (), v / 1e3) for k, v in est_ms.items()},
    )


def test_compare_profiles_ratios() -> None:
    before = fake_profile(1_000_000, 2.0, {"rx580": 4.0, "h100-sxm": 1.0})
    after = fake_profile(500_000, 1.0, {"rx580": 1.0})
    lines = compare_profiles(before, after).splitlines()
    assert lines[0].split() == ["metric", "before", "after", "ratio"]
    rows = {line[:26].strip(): line[26:].split() for line in lines[1:]}
    assert rows["params (M)"] == ["1.0000", "0.5000", "0.50x"]
    assert rows["size (MB)"] == ["4.000", "2.000", "0.50x"]
    assert rows["latency cpu (ms)"] == ["2.000", "1.000", "0.50x"]
    assert rows["peak memory (MB)"] == ["0.000", "0.000", "-"]
    assert rows["est. rx580 (ms)"] == ["4.0000", "1.0000", "0.25x"]
    assert "est. h100-sxm (ms)" not in rows  # only profiles both sides have


def test_profile_model_arguments() -> None:
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        profile_model(lambda x: x, torch.ones(1), device="cpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="invalid device 'gpu0'"):
        profile_model(tiny(), torch.ones(1, 3, 8, 8), device="gpu0")
    with pytest.raises(TypeError, match="two ModelProfile"):
        compare_profiles(1, 2)  # type: ignore[arg-type]


@pytest.mark.gpu
def test_profile_model_on_cuda_moves_back() -> None:
    model = tiny()
    p = profile_model(
        model,
        torch.randn(2, 3, 8, 8),
        device="cuda",
        profiles=["rx580"],
        repeats=3,
        min_time_s=0.01,
    )
    assert p.device == "cuda:0" and p.memory.method == "cuda-allocator"
    assert p.latency.device == "cuda:0"
    assert next(model.parameters()).device.type == "cpu"
