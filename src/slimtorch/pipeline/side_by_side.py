"""The compress report's before/after measurements of whole models, side by side.

Both models are timed (and their peak memory taken) in alternating rounds on one input, so
drift on a shared machine hits both alike; the verdict (:mod:`slimtorch.pipeline.verdict`)
reads only such paired measurements.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

SIDE_BY_SIDE_ROUNDS = 9
"""Alternating rounds of the final before/after latency (each the median of 5 calls)."""


MEMORY_ROUNDS = 5
"""Alternating peak-memory measurements of the two models in the compress report."""


def side_by_side(
    before: nn.Module,
    after: nn.Module,
    shape: Sequence[int],
    device: torch.device,
    threads: int | None,
) -> dict[str, Any]:
    """Both models timed in alternating rounds on one input, so drift on a shared machine hits
    both alike (:func:`~slimtorch.decompose.speed.layer_speedup` on whole models)."""
    from slimtorch.decompose.speed import layer_speedup

    before.eval()
    after.eval()
    check = layer_speedup(
        before, after, tuple(shape), device=device, threads=threads,
        repeats=SIDE_BY_SIDE_ROUNDS, calls=5,
    )  # fmt: skip
    return {
        "before_s": check.original_s,
        "after_s": check.factorised_s,
        "speedup": check.speedup,
        "rounds": SIDE_BY_SIDE_ROUNDS,
        "faster_rounds": check.faster_rounds,
        "source": check.source,
        "memory": _memory_side_by_side(before, after, shape, device),
    }


def _memory_side_by_side(
    before: nn.Module, after: nn.Module, shape: Sequence[int], device: torch.device
) -> dict[str, Any]:
    """Peak memory of both models' forward passes, measured in alternating rounds: on the CPU
    the resident set a call adds depends on the process's heap at the time, so two profiles
    taken minutes apart differ for the same model (lenet5 0.250 against 0.279 MB)."""
    from slimtorch.core.measure import measure_peak_memory

    dtype = next((p.dtype for p in before.parameters() if p.is_floating_point()), torch.float32)
    x = torch.randn(*shape, device=device, dtype=dtype)
    x_after = x.to(next((p.dtype for p in after.parameters() if p.is_floating_point()), dtype))
    peaks: dict[str, list[int]] = {"before": [], "after": []}
    with torch.inference_mode():
        for _ in range(MEMORY_ROUNDS):
            peaks["before"].append(measure_peak_memory(before, x, device=device).peak_bytes)
            peaks["after"].append(measure_peak_memory(after, x_after, device=device).peak_bytes)
    b, a = (sorted(peaks[k])[(MEMORY_ROUNDS - 1) // 2] for k in ("before", "after"))
    overlap = max(min(peaks["before"]), min(peaks["after"])) <= min(
        max(peaks["before"]), max(peaks["after"])
    )
    return {"before_bytes": b, "after_bytes": a, "rounds": MEMORY_ROUNDS,
            "samples": peaks, "overlap": overlap}  # fmt: skip


def compiled_side_by_side(
    before: nn.Module, after: nn.Module, x: torch.Tensor, *, max_autotune: bool
) -> dict[str, Any]:
    """Both models compiled and timed side by side on ``x``'s shape and device (CPU: through
    :func:`~slimtorch.quant.compile_int8_x86`, with freezing and optionally ``max_autotune``).

    Returns ``{"compiled_latency": {...}}``, or ``{"hint": ...}`` saying why the check was
    skipped: float64 on the CPU, or a device inductor cannot compile for
    (:func:`~slimtorch.core.devices.compile_problem`: a CPU without a C++ compiler, the GTX
    1060, the RX 580), which would
    otherwise fail the run after its transform. Ends with ``torch._dynamo.reset()``.
    """
    from slimtorch.core.devices import compile_problem
    from slimtorch.decompose.speed import layer_speedup
    from slimtorch.quant import compile_int8_x86

    if x.device.type == "cpu" and any(p.dtype == torch.float64 for p in after.parameters()):
        return {"hint": "compiled check skipped: inductor's frozen CPU kernels take no float64"}
    if (problem := compile_problem(x.device)) is not None:
        return {"hint": f"compiled check skipped: {problem}"}

    def compiled(m: nn.Module) -> nn.Module:
        m = copy.deepcopy(m).eval()
        if x.device.type == "cpu":
            return compile_int8_x86(m, max_autotune=max_autotune)
        mode = "max-autotune-no-cudagraphs" if max_autotune else None
        return torch.compile(m, dynamic=False, mode=mode)  # type: ignore[return-value]

    check = layer_speedup(
        compiled(before), compiled(after), tuple(x.shape), device=x.device, repeats=5, calls=5
    )
    torch._dynamo.reset()  # the two graphs would count against the recompile limit later
    source = f"{check.source},compiled" + (",max_autotune" if max_autotune else "")
    timed = {"before_s": check.original_s, "after_s": check.factorised_s, "source": source}
    return {"compiled_latency": {**timed, "speedup": check.speedup, "rounds": check.rounds,
                                 "faster_rounds": check.faster_rounds}}  # fmt: skip
