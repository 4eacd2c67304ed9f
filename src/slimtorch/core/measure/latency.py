"""Measured latency: warm-up, device synchronisation around every timed call, robust statistics.

Each timed call is ``synchronize; t0 = perf_counter(); fn(*inputs); synchronize; t1``, so a GPU
figure is the time until the device has finished, host launch cost included. Modules run under
``torch.inference_mode``; the CPU thread count is fixed for the run (:func:`cpu_threads`) and
restored after. Report the median: on a shared machine the mean is pulled up by outliers.

Example:
    >>> r = measure_latency(nn.Linear(64, 64), torch.randn(8, 64), threads=1, min_time_s=0)
    >>> r.repeats, r.threads, r.median_s < 0.1
    (10, 1, True)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from slimtorch.core.devices import as_device, cpu_threads, keeps_rng, synchronize

logger = logging.getLogger(__name__)

MAX_REPEATS = 10_000


@dataclasses.dataclass(frozen=True)
class LatencyResult:
    """Statistics of the timed calls, in seconds.

    Attributes:
        median_s, mean_s, std_s, p10_s, p90_s, min_s: Statistics of the per-call times.
        repeats: Timed calls (warm-up calls excluded).
        device: Where it ran (``"cpu"``, ``"cuda:0"``).
        threads: ``torch.get_num_threads()`` during the run.
    """

    median_s: float
    mean_s: float
    std_s: float
    p10_s: float
    p90_s: float
    min_s: float
    repeats: int
    device: str
    threads: int

    @property
    def spread(self) -> float:
        """Relative spread ``(p90 - p10) / median``: 0.05 means the middle 80% lie within 5%."""
        return (self.p90_s - self.p10_s) / self.median_s if self.median_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, the spread included."""
        return {**dataclasses.asdict(self), "spread": self.spread}

    def __str__(self) -> str:
        return (
            f"{self.median_s * 1e3:.3f} ms (p10-p90 {self.p10_s * 1e3:.3f}-{self.p90_s * 1e3:.3f} "
            f"ms, n={self.repeats}, {self.device}, {self.threads} thread(s))"
        )


def _infer_device(fn: Any, inputs: tuple[Any, ...]) -> torch.device:
    if isinstance(fn, nn.Module):
        for p in fn.parameters():
            return p.device
        for b in fn.buffers():
            return b.device
    for x in inputs:
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")


def summarize(times: list[float], device: str, threads: int) -> LatencyResult:
    """Statistics of per-call ``times`` (seconds).

    Example:
        >>> summarize([0.001, 0.002, 0.003], "cpu", 1).median_s
        0.002
    """
    if not times:
        raise ValueError("summarize needs at least one time; got an empty list")
    arr = np.asarray(times, dtype=np.float64)
    if not (np.isfinite(arr).all() and (arr >= 0).all()):
        raise ValueError(f"times must be finite and >= 0 seconds, got {times!r}")
    return LatencyResult(
        median_s=float(np.median(arr)),
        mean_s=float(arr.mean()),
        std_s=float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
        p10_s=float(np.percentile(arr, 10)),
        p90_s=float(np.percentile(arr, 90)),
        min_s=float(arr.min()),
        repeats=int(arr.size),
        device=device,
        threads=threads,
    )


@keeps_rng  # a train-mode dropout would draw once per timed call
def measure_latency(
    fn_or_model: Callable[..., Any],
    *inputs: Any,
    device: str | torch.device | None = None,
    warmup: int = 3,
    repeats: int = 10,
    min_time_s: float = 0.1,
    threads: int | None = None,
) -> LatencyResult:
    """Time ``fn_or_model(*inputs)``.

    Runs ``warmup`` untimed calls, then ``repeats`` timed calls, then more timed calls while the
    timed total is below ``min_time_s`` (at most 10000). With ``min_time_s=0`` it makes exactly
    ``warmup + repeats`` calls.

    Args:
        fn_or_model: A callable or ``nn.Module`` (run under ``torch.inference_mode``; its
            train/eval mode is left as is, and it is not moved).
        *inputs: Positional arguments; tensors are moved to ``device`` first.
        device: Device to synchronise (``None``: the module's, else the first tensor input's,
            else the CPU).
        warmup: Untimed calls first (compilation, allocator and cache warm-up).
        repeats: Minimum number of timed calls.
        min_time_s: Minimum total timed time; more calls are made until it is reached.
        threads: CPU thread count for the run (``None``: keep the current one).

    Returns:
        A :class:`LatencyResult`.

    Example:
        >>> r = measure_latency(lambda: time.sleep(0.02), warmup=1, repeats=5, min_time_s=0)
        >>> r.repeats, 0.02 <= r.median_s < 0.1  # a sleep lasts at least as long as asked
        (5, True)
    """
    if not callable(fn_or_model):
        raise TypeError(f"fn_or_model must be callable, got {type(fn_or_model).__name__}")
    for name, value, low in (("warmup", warmup, 0), ("repeats", repeats, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    bad_time = isinstance(min_time_s, bool) or not isinstance(min_time_s, int | float)
    if bad_time or not 0 <= min_time_s < math.inf:  # nan fails the comparison too
        raise ValueError(f"min_time_s must be a number >= 0 and finite, got {min_time_s!r}")
    dev = as_device(device) if device is not None else _infer_device(fn_or_model, inputs)
    if dev.type == "meta":  # meta tensors hold no data: nothing would be computed or timed
        raise ValueError(
            "cannot time on the meta device (no data, nothing is computed); load the weights "
            "and pass real tensors on a real device"
        )
    inputs = tuple(x.to(dev) if isinstance(x, torch.Tensor) else x for x in inputs)
    is_module = isinstance(fn_or_model, nn.Module)
    times: list[float] = []
    with cpu_threads(threads) as n_threads:
        ctx = torch.inference_mode() if is_module else contextlib.nullcontext()
        with ctx:
            for _ in range(warmup):
                fn_or_model(*inputs)
            synchronize(dev)
            total = 0.0
            while len(times) < repeats or (total < min_time_s and len(times) < MAX_REPEATS):
                synchronize(dev)
                t0 = time.perf_counter()
                fn_or_model(*inputs)
                synchronize(dev)
                dt = time.perf_counter() - t0
                times.append(dt)
                total += dt
    result = summarize(times, str(dev), n_threads)
    logger.debug("latency: %s", result)
    return result
