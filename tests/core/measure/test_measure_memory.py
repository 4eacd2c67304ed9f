"""Tests of slimtorch.core.measure.memory: a 200 MB allocation reads as ~200 MB."""

from __future__ import annotations

import time

import pytest
import torch

from slimtorch.core.measure import measure_peak_memory
from slimtorch.core.measure import memory as memory_mod

MB200 = 200 * 10**6


def alloc_200mb(hold_s: float = 0.0) -> None:
    t = torch.ones(MB200 // 4, dtype=torch.float32)  # ones: every page is touched
    if hold_s:
        time.sleep(hold_s)
    del t


def test_cpu_peak_of_200mb() -> None:
    r = measure_peak_memory(alloc_200mb, device="cpu")
    assert r.method in ("rss", "rss-sampled")
    assert abs(r.peak_bytes - MB200) < 0.1 * MB200
    assert r.baseline_bytes > 0 and r.device == "cpu"


def test_cpu_peak_with_args_and_nothing_allocated() -> None:
    r = measure_peak_memory(lambda n: sum(range(n)), 100, device=torch.device("cpu"))
    assert r.peak_bytes < 20 * 10**6


def test_sampling_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory_mod, "_reset_hwm", lambda: False)
    r = measure_peak_memory(alloc_200mb, 0.2, device="cpu")  # held long enough on a busy machine
    assert r.method == "rss-sampled"
    assert abs(r.peak_bytes - MB200) < 0.1 * MB200


def test_without_proc_or_psutil_the_peak_is_unavailable_not_a_crash(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    # macOS and Windows have no /proc: the lifetime ru_maxrss read 0 for any call smaller than
    # an earlier peak, and on Windows `import resource` (and ctypes.CDLL(None)) failed
    import sys
    from pathlib import Path

    monkeypatch.setattr(memory_mod, "_STATUS", Path(str(tmp_path)) / "no-status")
    monkeypatch.setattr(memory_mod, "_STATM", Path(str(tmp_path)) / "no-statm")
    monkeypatch.setitem(sys.modules, "psutil", None)
    monkeypatch.setitem(sys.modules, "resource", None)
    calls = []
    r = measure_peak_memory(lambda: calls.append(1), device="cpu")
    assert calls == [1] and (r.peak_bytes, r.method) == (0, "unavailable")


def test_malloc_trim_is_looked_up_on_linux_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    memory_mod._malloc_trim.cache_clear()
    monkeypatch.setattr(sys, "platform", "win32")  # where ctypes.CDLL(None) raises TypeError
    try:
        assert memory_mod._malloc_trim() is None and not memory_mod._release_free_heap()
    finally:
        memory_mod._malloc_trim.cache_clear()


def test_fn_runs_once_even_if_the_peak_cannot_be_read(monkeypatch: pytest.MonkeyPatch) -> None:
    if not memory_mod._reset_hwm():
        pytest.skip("this kernel does not let a process reset VmHWM")
    calls = []
    real = memory_mod._status_bytes
    monkeypatch.setattr(memory_mod, "_reset_hwm", lambda: True)

    def fn() -> None:
        calls.append(1)
        monkeypatch.setattr(memory_mod, "_status_bytes", lambda key: None)  # /proc goes away

    r = measure_peak_memory(fn, device="cpu")
    monkeypatch.setattr(memory_mod, "_status_bytes", real)
    assert calls == [1] and r.method == "rss-sampled"


def test_warm_reuse_of_freed_heap_memory_still_counts() -> None:
    # 8 MB sits under glibc's largest mmap threshold: once freed it stays in the heap, and a
    # second allocation reuses those pages without growing the resident set
    if not memory_mod._release_free_heap() or not memory_mod._reset_hwm():
        pytest.skip("needs glibc's malloc_trim and a resettable VmHWM")

    def fn() -> None:
        torch.ones(2 * 10**6)

    for _ in range(3):
        fn()
    peaks = [measure_peak_memory(fn, device="cpu").peak_bytes for _ in range(3)]
    assert all(7.5e6 < p < 9e6 for p in peaks), peaks


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="fn must be callable"):
        measure_peak_memory(3, device="cpu")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"device must be a str or torch\.device"):
        measure_peak_memory(alloc_200mb, device=0)  # type: ignore[arg-type]


@pytest.mark.gpu
def test_cuda_allocator_peak() -> None:
    keep = torch.ones(10**6, device="cuda")  # in use before: not counted

    def fn() -> None:
        t = torch.ones(100 * 10**6 // 4, device="cuda")
        del t

    r = measure_peak_memory(fn, device="cuda:0")
    assert r.method == "cuda-allocator"
    assert 100 * 10**6 <= r.peak_bytes < 110 * 10**6
    assert r.baseline_bytes >= keep.numel() * 4
