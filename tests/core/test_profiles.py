"""Tests of slimtorch.core.profiles: built-in datasheet figures, validation, the CPU probe."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import pickle

import pytest
import torch

from slimtorch.core.errors import RegistryError
from slimtorch.core.profiles import (
    DeviceProfile,
    dtype_key,
    get_profile,
    list_profiles,
    measure_cpu_profile,
    register_profile,
)

BUILT_IN = ["gtx1060-6gb", "h100-sxm", "rtx3060-12gb", "rx580"]
RATES = {"fp32": 1e12, "fp16": 2e12, "bf16": 2e12, "int8": 4e12}


def toy(name: str = "toy", **changes: object) -> DeviceProfile:
    fields: dict[str, object] = dict(
        name=name,
        description="toy",
        peak_flops=RATES,
        memory_bandwidth=1e11,
        memory_bytes=2**30,
        launch_overhead_s=1e-5,
    )
    fields.update(changes)
    return DeviceProfile(**fields)  # type: ignore[arg-type]


def test_registry_lists_builtins_and_cpu() -> None:
    names = list_profiles()
    assert {*BUILT_IN, "cpu"} <= set(names)
    assert names == sorted(names)


def test_rx580_figures() -> None:
    p = get_profile("rx580")
    assert p.peak_flops["fp32"] == 6.17e12
    assert p.peak_flops["fp16"] == p.peak_flops["fp32"]  # no packed FP16 on Polaris
    assert p.peak_flops["int8"] <= p.peak_flops["fp32"]  # no int8 dot product
    assert p.peak_flops["bf16"] == p.peak_flops["fp32"]
    assert not p.int8_dot and not p.packed_fp16 and not p.tensor_cores
    assert p.memory_bandwidth == 256e9
    assert p.memory_bytes == 8 * 2**30
    assert p.launch_overhead_s == pytest.approx(1e-5)
    assert "estimate" in p.source and "AMD" in p.source


def test_gtx1060_figures() -> None:
    p = get_profile("gtx1060-6gb")
    assert p.peak_flops["fp32"] == pytest.approx(4.4e12, rel=0.02)
    # fp16 layers compute in fp32 units under PyTorch (cuDNN/cuBLAS float math on sm_61)
    assert p.peak_flops["fp16"] == p.peak_flops["fp32"]
    assert p.peak_flops["int8"] == pytest.approx(4 * p.peak_flops["fp32"], rel=0.01)
    assert (p.memory_bandwidth, p.memory_bytes) == (192e9, 6 * 2**30)
    assert p.int8_dot and not p.tensor_cores


def test_rtx3060_and_h100_figures() -> None:
    r = get_profile("rtx3060-12gb")
    assert r.peak_flops["fp32"] == pytest.approx(12.7e12, rel=0.01)
    assert r.peak_flops["fp16"] == r.peak_flops["bf16"] == pytest.approx(25.4e12)
    assert r.peak_flops["int8"] == pytest.approx(101e12, rel=0.01)
    assert (r.memory_bandwidth, r.memory_bytes, r.tensor_cores) == (360e9, 12 * 2**30, True)
    h = get_profile("h100-sxm")
    assert h.peak_flops["fp32"] == 67e12
    assert h.peak_flops["fp16"] == h.peak_flops["bf16"] == 989e12
    assert h.peak_flops["int8"] == 1979e12
    assert (h.memory_bandwidth, h.memory_bytes) == (3.35e12, 80 * 2**30)


@pytest.mark.parametrize("name", BUILT_IN)
def test_builtin_profiles_are_sane(name: str) -> None:
    p = get_profile(name)
    assert p.name == name and p.description
    assert "nvidia.com" in p.source.lower() or "amd.com" in p.source.lower()  # cites a datasheet
    for key in ("fp32", "fp16", "bf16", "int8"):
        assert 1e10 < p.peak_flops[key] < 1e16 and math.isfinite(p.peak_flops[key])
    assert 1e10 < p.memory_bandwidth < 1e13
    assert 2**30 <= p.memory_bytes <= 2**40
    assert 0 < p.launch_overhead_s < 1e-3
    assert DeviceProfile.from_dict(p.to_dict()) == p


def test_peak_rate_and_dtype_key() -> None:
    p = toy()
    assert p.peak_rate(torch.float16) == 2e12
    assert p.peak_rate("int8") == 4e12
    assert p.peak_rate(torch.float64) == 1e12  # unknown dtypes get the fp32 rate
    assert dtype_key("bfloat16") == "bf16" and dtype_key(torch.uint8) == "int8"
    with pytest.raises(ValueError, match="unknown dtype name 'float99'"):
        dtype_key("float99")


def test_profile_validation() -> None:
    with pytest.raises(ValueError, match="peak_flops lacks bf16, int8"):
        toy(peak_flops={"fp32": 1e12, "fp16": 1e12})
    with pytest.raises(ValueError, match=r"memory_bandwidth must be in \(0.0, inf\], got -1"):
        toy(memory_bandwidth=-1.0)
    with pytest.raises(ValueError, match=r"peak_flops\['fp16'\] must be in"):
        toy(peak_flops={**RATES, "fp16": 0.0})
    with pytest.raises(ValueError, match="must be finite"):
        toy(peak_flops={**RATES, "fp32": math.inf})
    with pytest.raises(TypeError, match="peak_flops must be a mapping"):
        toy(peak_flops=[1e12])
    with pytest.raises(ValueError, match="name must be a non-empty str"):
        toy(name="")


def test_profile_is_immutable() -> None:
    p = toy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.memory_bandwidth = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError, match="peak_flops is read-only"):
        p.peak_flops["fp32"] = 1.0  # type: ignore[index]
    with pytest.raises(TypeError, match="peak_flops is read-only"):
        p.peak_flops.update(fp32=1.0)
    assert p.peak_flops["fp32"] == 1e12


def test_profile_copies_pickles_and_serialises() -> None:
    p = get_profile("rx580")
    assert copy.deepcopy(p) == p and pickle.loads(pickle.dumps(p)) == p
    assert hash(copy.deepcopy(p)) == hash(p)
    data = json.loads(json.dumps(dataclasses.asdict(p)))
    assert data["peak_flops"] == {
        "fp32": 6.17e12,
        "fp16": 6.17e12,
        "bf16": 6.17e12,
        "int8": 6.17e12,
        "fp64": 0.386e12,
    }
    assert DeviceProfile.from_dict(p.to_dict()) == p


def test_register_and_get() -> None:
    p = register_profile(toy("test-profiles-toy"))
    assert get_profile("test-profiles-toy") is p
    assert get_profile(p) is p
    with pytest.raises(RegistryError, match="'test-profiles-toy' is already registered"):
        register_profile(toy("test-profiles-toy"))
    with pytest.raises(ValueError, match="unknown device profile 'nope'; valid choices: cpu"):
        get_profile("nope")
    with pytest.raises(TypeError, match="expects a DeviceProfile"):
        register_profile("rx580")  # type: ignore[arg-type]


def test_cpu_probe_positive_finite_and_cached() -> None:
    before = torch.get_num_threads()
    p = measure_cpu_profile(threads=1, seconds=0.2)
    assert torch.get_num_threads() == before
    assert p.name == "cpu" and p.source.startswith("measured on this machine")
    for key in ("fp32", "fp16", "bf16", "int8"):
        assert math.isfinite(p.peak_flops[key]) and p.peak_flops[key] > 1e8
    assert math.isfinite(p.memory_bandwidth) and p.memory_bandwidth > 1e8
    assert 0 < p.launch_overhead_s < 1e-2
    assert measure_cpu_profile(threads=1) is p  # cached per thread count
    with pytest.raises(ValueError, match="seconds must be a positive number"):
        measure_cpu_profile(seconds=0)


def test_get_profile_cpu_is_measured_with_current_threads() -> None:
    p = get_profile("cpu")
    assert p is measure_cpu_profile()
    assert f"{torch.get_num_threads()} torch thread" in p.description
