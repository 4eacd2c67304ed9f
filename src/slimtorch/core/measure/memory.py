"""Peak memory of one call, above what was in use just before it.

* CUDA/ROCm (``method="cuda-allocator"``): ``torch.cuda.reset_peak_memory_stats`` then
  ``max_memory_allocated`` minus the allocated bytes before the call. Counts tensors only, not the
  CUDA context or the caching allocator's reserve.
* CPU on Linux >= 4.0 (``method="rss"``): writing ``5`` to ``/proc/self/clear_refs`` resets the
  kernel's peak resident set (``VmHWM``) to the current one; the peak is ``VmHWM`` after the call
  minus ``VmRSS`` before. Exact, whole process (so a concurrent thread's allocations count too).
  Before that, glibc's ``malloc_trim(0)`` hands the heap's free pages back to the kernel. Without
  it a warm model's second forward pass reuses the pages its first one freed, the resident set
  does not grow, and the peak reads 0: a repeated 8 MB allocation measured 0 bytes untrimmed and
  8.0 MB trimmed, resnet20's batch-1 forward 0 and 0.73-0.84 MB (its tensors' own peak, from the
  profiler's allocation events, is 0.65 MB; the rest is oneDNN's scratch memory and page
  rounding). Other C libraries keep their free lists, so there the figure can read low.
* Elsewhere (``method="rss-sampled"``): a thread samples the resident set every millisecond;
  a peak shorter than that can be missed.

Example:
    >>> r = measure_peak_memory(lambda: torch.ones(25_000_000), device="cpu")  # 100 MB
    >>> 95e6 < r.peak_bytes < 110e6  # the process's resident set: within a few MB of that
    True
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from slimtorch.core.devices import as_device, keeps_rng, synchronize

logger = logging.getLogger(__name__)

MemoryMethod = Literal["cuda-allocator", "rss", "rss-sampled", "unavailable"]

_STATUS = Path("/proc/self/status")
_STATM = Path("/proc/self/statm")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclasses.dataclass(frozen=True)
class MemoryResult:
    """Peak memory of one call.

    Attributes:
        peak_bytes: Peak above the baseline (never negative).
        baseline_bytes: Memory in use just before the call (allocated tensors or RSS).
        method: ``"cuda-allocator"``, ``"rss"`` or ``"rss-sampled"`` (module docstring).
        device: Where it ran.
    """

    peak_bytes: int
    baseline_bytes: int
    method: MemoryMethod
    device: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)


def _status_bytes(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _rss_now() -> int | None:
    """The process's resident set now: from /proc, else psutil (macOS, Windows), else None
    (``ru_maxrss`` is the lifetime peak, not the current size: a call smaller than an earlier
    peak would read 0)."""
    rss = _status_bytes("VmRSS")
    if rss is not None:
        return rss
    try:
        return int(_STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None under other C libraries (and off Linux, where
    ``ctypes.CDLL(None)`` raises TypeError on Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def _release_free_heap() -> bool:
    """Return the C heap's free pages to the kernel (glibc ``malloc_trim``); False elsewhere."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    if _status_bytes("VmHWM") is None:
        return False
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError as exc:
        logger.debug("cannot reset VmHWM through %s: %s", _CLEAR_REFS, exc)
        return False


@functools.cache
def _warn_unmeasured() -> None:
    logger.warning(
        "CPU peak memory is not measured here (no /proc and no psutil): reported as 0 with "
        "method 'unavailable'; pip install psutil to measure it"
    )


def _cpu_peak(call: Callable[[], Any]) -> tuple[int, int, MemoryMethod]:
    _release_free_heap()
    if _reset_hwm():  # /proc is there: so is VmRSS
        baseline = _rss_now() or 0
        call()  # run once only: fn may have side effects
        hwm = _status_bytes("VmHWM")
        if hwm is not None:
            return max(0, hwm - baseline), baseline, "rss"
        logger.warning("VmHWM unreadable after the call; reporting the RSS after it instead")
        return max(0, (_rss_now() or 0) - baseline), baseline, "rss-sampled"
    start = _rss_now()
    if start is None:
        _warn_unmeasured()
        call()
        return 0, 0, "unavailable"
    baseline = peak = start
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _rss_now() or 0)
            stop.wait(0.001)

    sampler = threading.Thread(target=sample, name="slimtorch-rss-sampler", daemon=True)
    sampler.start()
    try:
        call()
    finally:
        peak = max(peak, _rss_now() or 0)
        stop.set()
        sampler.join()
    return max(0, peak - baseline), baseline, "rss-sampled"


@keeps_rng  # a train-mode dropout would draw once per call
def measure_peak_memory(
    fn: Callable[..., Any], *args: Any, device: str | torch.device
) -> MemoryResult:
    """Peak memory that ``fn(*args)`` needs above what was in use before it.

    The result of ``fn`` is dropped as soon as it returns. On MPS the process RSS is sampled
    (Apple unified memory shows there).

    Args:
        fn: The callable (wrap a model as ``lambda: model(x)``, under ``torch.inference_mode``
            if wanted).
        *args: Its positional arguments.
        device: The device it runs on (CUDA/ROCm use the allocator statistics).

    Returns:
        A :class:`MemoryResult`.

    Example:
        >>> model, x = nn.Upsample(scale_factor=10), torch.randn(1, 1, 500, 500)
        >>> r = measure_peak_memory(model, x, device="cpu")  # its output: 5000x5000 fp32, 100 MB
        >>> 95e6 < r.peak_bytes < 110e6  # on a GPU: model and x there, device="cuda:0"
        True
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if not isinstance(device, str | torch.device):
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
    dev = as_device(device)
    if dev.type == "meta":
        raise ValueError("cannot measure memory on the meta device: nothing is allocated there")

    def call() -> None:
        fn(*args)
        synchronize(dev)

    if dev.type == "cuda":
        synchronize(dev)
        baseline = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        call()
        peak = torch.cuda.max_memory_allocated(dev)
        return MemoryResult(max(0, peak - baseline), baseline, "cuda-allocator", str(dev))
    peak, baseline, method = _cpu_peak(call)
    return MemoryResult(peak, baseline, method, str(dev))
