"""Tests of slimtorch.core.devices: detection, device specs, synchronisation, thread counts."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from slimtorch.core import devices
from slimtorch.core.devices import (
    DeviceInfo,
    cpu_threads,
    detect_devices,
    read_meminfo,
    resolve_device,
    synchronize,
)


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)


@pytest.fixture
def fake_two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)


def test_cpu_is_always_first_and_reads_meminfo(no_gpu: None) -> None:
    found = detect_devices()
    assert [d.kind for d in found] == ["cpu"]
    cpu = found[0]
    assert cpu.device == "cpu" and cpu.index == 0
    assert cpu.threads == torch.get_num_threads()
    assert cpu.cpu_count is not None and cpu.cpu_count >= 1
    mem = read_meminfo()
    if mem:  # Linux: the totals come from /proc/meminfo
        assert cpu.total_memory_bytes == mem["MemTotal"]
        assert cpu.free_memory_bytes is not None
        assert 0 < cpu.free_memory_bytes <= cpu.total_memory_bytes
    assert json.loads(json.dumps(cpu.to_dict()))["kind"] == "cpu"


def test_read_meminfo_converts_kb_to_bytes(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "meminfo"
    fake.write_text("MemTotal:       1000 kB\nMemAvailable:    250 kB\nHugePages_Total:       3\n")
    monkeypatch.setattr(devices, "_MEMINFO", fake)
    assert read_meminfo() == {"MemTotal": 1_024_000, "MemAvailable": 256_000, "HugePages_Total": 3}
    monkeypatch.setattr(devices, "_MEMINFO", tmp_path / "missing")
    assert read_meminfo() == {}


def test_rocm_device_reports_gfx_arch(monkeypatch: pytest.MonkeyPatch) -> None:
    props = SimpleNamespace(
        name="AMD Radeon RX 580",
        major=8,
        minor=0,
        total_memory=8 * 2**30,
        multi_processor_count=36,
        gcnArchName="gfx803:xnack-",
    )
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (6 * 2**30, 8 * 2**30))
    monkeypatch.setattr(torch.version, "hip", "6.0.32830")
    info = devices._gpu_info(0)
    assert (info.kind, info.device, info.gfx_arch) == ("rocm", "cuda:0", "gfx803")
    assert info.supports_fp16 and not info.supports_bf16  # Polaris: no bf16
    assert info.free_memory_bytes == 6 * 2**30 and info.backend_version == "6.0.32830"


def test_cuda_device_capabilities(monkeypatch: pytest.MonkeyPatch) -> None:
    def props(major: int, minor: int) -> SimpleNamespace:
        return SimpleNamespace(
            name="NVIDIA",
            major=major,
            minor=minor,
            total_memory=6 * 2**30,
            multi_processor_count=10,
        )

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (1, 6 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props(6, 1))
    pascal = devices._gpu_info(1)
    assert (pascal.kind, pascal.device, pascal.compute_capability) == ("cuda", "cuda:1", "6.1")
    assert pascal.supports_fp16 and not pascal.supports_bf16 and pascal.gfx_arch is None
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props(8, 6))
    assert devices._gpu_info(0).supports_bf16


def test_resolve_cpu_and_auto_without_gpu(no_gpu: None) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device() == torch.device("cpu")


def test_resolve_auto_prefers_cuda_then_mps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_mps_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda", 0)


def test_resolve_cuda_index_and_rocm_alias(fake_two_gpus: None) -> None:
    assert resolve_device("cuda") == torch.device("cuda", 1)  # the current device
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("rocm:1") == torch.device("cuda", 1)
    assert resolve_device(" CUDA:1 ") == torch.device("cuda", 1)


def test_resolve_errors(no_gpu: None, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"invalid device 'banana'; expected 'auto'"):
        resolve_device("banana")
    with pytest.raises(ValueError, match="sees none; use 'cpu' or 'auto'"):
        resolve_device("cuda:0")
    with pytest.raises(ValueError, match="MPS, which is not available"):
        resolve_device("mps")
    with pytest.raises(ValueError, match="unsupported device 'meta'"):
        resolve_device("meta")
    with pytest.raises(TypeError, match=r"must be a str or torch\.device, got int"):
        resolve_device(0)  # type: ignore[arg-type]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"'cuda:3' does not exist: 1 CUDA/ROCm device\(s\)"):
        resolve_device("cuda:3")
    # a data-parallel process is handed its GPU (often the only one it sees) and maps the index
    assert resolve_device("cuda:3", any_index=True) == torch.device("cuda", 3)


def test_synchronize_cpu_is_a_noop() -> None:
    synchronize("cpu")
    synchronize(torch.device("cpu"))


def test_cpu_threads_sets_and_restores() -> None:
    before = torch.get_num_threads()
    with cpu_threads(1) as n:
        assert n == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == before
    with cpu_threads(None) as n:
        assert n == before
    with pytest.raises(RuntimeError), cpu_threads(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads must be a positive int"), cpu_threads(0):
        pass


def test_device_info_is_frozen() -> None:
    info = DeviceInfo(
        kind="cpu", index=0, device="cpu", name="x", total_memory_bytes=1, free_memory_bytes=None
    )
    with pytest.raises(AttributeError):
        info.name = "y"  # type: ignore[misc]


def test_import_does_not_initialise_cuda_or_probe() -> None:
    code = (
        "import torch, slimtorch.core.devices, slimtorch.core.profiles as p, "
        "slimtorch.core.measure, sys\n"
        "assert not torch.cuda.is_initialized()\n"
        "assert p._CPU_CACHE == {}\n"
        "assert 'torch.utils.flop_counter' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.gpu
def test_gpu_detected_and_resolved() -> None:
    found = detect_devices()
    gpus = [d for d in found if d.kind in ("cuda", "rocm")]
    assert len(gpus) == torch.cuda.device_count() >= 1
    assert gpus[0].total_memory_bytes > 0 and gpus[0].compute_capability
    assert gpus[0].free_memory_bytes is not None
    assert gpus[0].free_memory_bytes <= gpus[0].total_memory_bytes
    if torch.version.hip:
        assert gpus[0].gfx_arch and gpus[0].gfx_arch.startswith("gfx")
    assert resolve_device("auto") == torch.device("cuda", 0)
    x = torch.ones(1000, device="cuda") * 2
    synchronize("cuda:0")
    assert x.sum().item() == 2000


def test_run_info_records_command_device_and_versions() -> None:
    from slimtorch.core.devices import run_info

    info = run_info("cpu", ["bench.py", "--name", "a b"])
    assert info["command"] == "python bench.py --name 'a b'"
    assert info["device"] == "cpu" and info["device_name"]
    assert info["torch"] == torch.__version__ and info["threads"] == torch.get_num_threads()
    assert info["date"].endswith("+00:00")


@pytest.mark.parametrize(
    ("hip", "major", "gfx", "problem"),
    [
        (None, 6, "", "compute capability 7.0 or newer; NVIDIA GeForce GTX 1060 6GB has 6.1"),
        (None, 7, "", None),
        ("6.0.32830", 8, "gfx803:xnack-", "does not support NVIDIA GeForce GTX 1060 6GB (gfx803)"),
        ("6.0.32830", 9, "gfx90a:sramecc+:xnack-", None),
    ],
)
def test_compile_problem_names_gpus_inductor_cannot_compile_for(
    monkeypatch: pytest.MonkeyPatch, hip: str | None, major: int, gfx: str, problem: str | None
) -> None:
    # inductor lets a GTX 1060 trace and fails at code generation; on ROCm it lets every GPU
    # through to Triton, whose AMD backend has no gfx803
    import torch.utils._triton as triton_utils

    props = SimpleNamespace(name="NVIDIA GeForce GTX 1060 6GB", major=major, minor=1,
                            gcnArchName=gfx)  # fmt: skip
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(triton_utils, "has_triton_package", lambda: True)
    found = devices.compile_problem("cuda:0")
    assert found is None if problem is None else problem in str(found)
    assert devices.compile_problem("meta") is None
    monkeypatch.setattr(triton_utils, "has_triton_package", lambda: False)
    if problem is None:
        assert devices.compile_problem("cuda:0") == "the triton package is not installed"


def test_compile_problem_names_a_missing_cpu_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    # inductor's CPU code is C++: without a compiler (Windows without MSVC) the compiled speed
    # check failed with InvalidCxxCompiler after every layer had been factorised
    from torch._inductor import cpp_builder
    from torch._inductor.exc import InvalidCxxCompiler

    def missing() -> str:
        raise InvalidCxxCompiler

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", missing)
    assert "needs a C++ compiler, and none was found" in str(devices.compile_problem("cpu"))
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", lambda: "g++")
    assert devices.compile_problem("cpu") is None
