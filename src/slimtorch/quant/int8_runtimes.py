"""Int8 where it really runs: a Q/DQ model and its float original, timed side by side in the
runtimes that have int8 kernels.

Run eagerly, a Q/DQ model simulates int8 in float and is slower than the float model (resnet20
at batch 32 on a 2-thread x86 CPU: 21.5 ms against 9.5 ms, docs/benchmarks.md). Its int8
kernels run in two CPU runtimes: inductor with oneDNN (:func:`compile_int8_x86`) and ONNX
Runtime's CPU provider (:func:`export_onnx`). :func:`time_int8_runtimes` builds the quantized
model and its float original in each runtime the same way, checks that int8 kernels really run
and that the outputs match the eager Q/DQ model, and times the two alternately on one batch
(:func:`~slimtorch.decompose.speed.layer_speedup`'s interleaved rounds, so drift on a shared
machine hits both alike). The speed-up is what a user of that runtime gets. A runtime that is
not installed, fails to build, or runs no int8 kernel is recorded as skipped with the reason; a
weight-only model (no layer quantizes its input) is not built at all: every runtime computes it
in float.

ONNX Runtime is called the way :func:`run_onnx` calls it (a tensor in, a tensor out), for both
models alike.

Example (compiles and exports for several seconds, hence skipped as a test):
    >>> from slimtorch.models import create_model
    >>> from slimtorch.quant import PTQConfig, quantize_
    >>> fp32 = create_model("lenet5", in_channels=1, input_size=28).eval()
    >>> int8 = copy.deepcopy(fp32)
    >>> calib = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(2)]
    >>> _ = quantize_(int8, PTQConfig(mode="static"), calibration=calib)
    >>> timings = time_int8_runtimes(fp32, int8, torch.randn(32, 1, 28, 28))  # doctest: +SKIP
    >>> sorted(timings), timings["onnxruntime"].int8_kernels  # doctest: +SKIP
    (['inductor', 'onnxruntime'], {'QGemm': 2, 'QLinearConv': 2})
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtorch.core.devices import cpu_threads
from slimtorch.core.errors import is_onnxruntime_error
from slimtorch.quant.convert import QDQAct
from slimtorch.quant.export import export_onnx, is_qdq_model, ort_int8_ops, ort_session, run_onnx
from slimtorch.quant.qdq import QDQConv2d, QDQLinear

logger = logging.getLogger(__name__)

RUNTIMES = ("inductor", "onnxruntime")
"""The CPU runtimes :func:`time_int8_runtimes` knows."""


@dataclasses.dataclass(frozen=True)
class RuntimeTiming:
    """One runtime's figures for the float original and the int8 model, on one batch.

    Attributes:
        runtime: ``"inductor"`` or ``"onnxruntime"``.
        batch: The batch size timed.
        threads: CPU threads of both runs.
        fp32_s: Seconds per call of the float original in this runtime (median over rounds).
        int8_s: Seconds per call of the int8 model in this runtime.
        speedup: ``fp32_s / int8_s`` (> 1: int8 is faster here).
        int8_kernels: The int8 kernels the runtime runs (oneDNN ops in inductor's code, int8
            operators in ONNX Runtime's optimised graph) and how many of each.
        max_abs_diff: Largest difference between the runtime's int8 outputs and the eager Q/DQ
            model's on the timed batch (int8 rounding in another kernel, not a simulation).
        skipped: Why the runtime was not timed (then the figures are None).
        rounds: Interleaved timing rounds.
        faster_rounds: In how many of them int8 was the faster one.
    """

    runtime: str
    batch: int
    threads: int
    fp32_s: float | None = None
    int8_s: float | None = None
    speedup: float | None = None
    int8_kernels: dict[str, int] = dataclasses.field(default_factory=dict)
    max_abs_diff: float | None = None
    skipped: str | None = None
    rounds: int | None = None
    faster_rounds: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        return dataclasses.asdict(self)


def _quantizes_inputs(model: nn.Module) -> bool:
    """Whether some layer of ``model`` quantizes its input, so int8 arithmetic can run."""
    return any(
        isinstance(m, QDQAct)
        or (isinstance(m, QDQConv2d | QDQLinear) and (m.input_scale is not None or m.input_dynamic))
        for m in model.modules()
    )


class _OrtModule(nn.Module):
    """An ONNX Runtime session called like a module (tensor in, tensor out)."""

    def __init__(self, session: Any) -> None:
        super().__init__()
        self.session = session

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_onnx(self.session, x)


Built = tuple[nn.Module, nn.Module, dict[str, int]]
"""A runtime's float and int8 forms of the two models, and the int8 kernels it runs."""


def _inductor(
    fp32: nn.Module, int8: nn.Module, x: torch.Tensor, threads: int, calibration: Any
) -> Built:
    from torch._inductor.utils import run_and_get_code

    from slimtorch.quant.runtime import compile_int8_x86, kernel_counts, wants_max_autotune

    # im2col + linear layers (lower_conv_gemm_) run as inductor's GEMM templates, for both alike
    autotune = wants_max_autotune(fp32) or wants_max_autotune(int8)
    fast_fp32 = compile_int8_x86(fp32, max_autotune=autotune)
    fast_int8 = compile_int8_x86(int8, max_autotune=autotune)
    # compiled under the timing's own state (threads, inference mode): dynamo guards on both
    with torch.inference_mode():
        fast_fp32(x)
        _, codes = run_and_get_code(fast_int8, x)  # compiles here, so its code can be read
    return fast_fp32, fast_int8, kernel_counts(codes)


def _onnxruntime(
    fp32: nn.Module, int8: nn.Module, x: torch.Tensor, threads: int, calibration: Any
) -> Built:
    with tempfile.TemporaryDirectory(prefix="slimtorch-ort-") as tmp:
        fp32_path = export_onnx(fp32, Path(tmp) / "fp32.onnx", x)
        int8_path = export_onnx(int8, Path(tmp) / "int8.onnx", x, calibration=calibration)
        try:
            built = [_OrtModule(ort_session(p, threads)) for p in (fp32_path, int8_path)]
            for module in built:
                module(x)  # the first run allocates, and fails here if it will
            kernels = ort_int8_ops(int8_path)
        except (ImportError, ValueError):
            raise
        except Exception as exc:  # onnxruntime's own errors derive from Exception only
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise RuntimeError(f"ONNX Runtime failed: {type(exc).__name__}: {first}") from exc
    return built[0], built[1], kernels


_BUILDERS: dict[str, Callable[[nn.Module, nn.Module, torch.Tensor, int, Any], Built]] = {
    "inductor": _inductor,
    "onnxruntime": _onnxruntime,
}


def time_int8_runtimes(
    reference: nn.Module,
    quantized: nn.Module,
    example: torch.Tensor,
    *,
    runtimes: tuple[str, ...] | list[str] = RUNTIMES,
    threads: int | None = None,
    calibration: Any = None,
    rounds: int = 7,
    calls: int = 5,
) -> dict[str, RuntimeTiming]:
    """Time ``quantized`` against its float original ``reference`` in each int8 CPU runtime.

    The compiled runtimes end with ``torch._dynamo.reset()``, which also drops the caller's own
    compiled code (it recompiles on its next call).

    Args:
        reference: The float model (as it was before quantization).
        quantized: Its Q/DQ int8 form (``quantize_``, ``convert_qat_``, ``mixed_precision_``).
            Neither model is changed: each runtime works on copies, on the CPU.
        example: The batch to time (its size is the batch the figures are for).
        runtimes: Which of :data:`RUNTIMES` to try.
        threads: CPU threads for both models (``None``: ``torch.get_num_threads()``).
        calibration: Inputs for the outputs ONNX Runtime's Q/DQ placement adds
            (see :func:`export_onnx`); without them those stay float.
        rounds: Interleaved timing rounds; each figure is the median over them.
        calls: Timed calls per model per round.

    Returns:
        Runtime name -> :class:`RuntimeTiming`, with the reason where a runtime was skipped.

    Raises:
        TypeError: A model is not an ``nn.Module`` or ``example`` is not a float tensor.
        ValueError: ``quantized`` has no Q/DQ layer, an unknown runtime, or bad counts.
    """
    from slimtorch.decompose.speed import layer_speedup

    for arg, module in (("reference", reference), ("quantized", quantized)):
        if not isinstance(module, nn.Module):
            raise TypeError(f"{arg} must be an nn.Module, got {type(module).__name__}")
    if not isinstance(example, torch.Tensor) or not example.is_floating_point():
        raise TypeError(f"example must be a float tensor, got {type(example).__name__}")
    if not is_qdq_model(quantized):
        raise ValueError(
            "quantized has no Q/DQ layer: pass the model quantize_ (or convert_qat_, "
            "mixed_precision_) returned, and its float original as reference"
        )
    unknown = [r for r in runtimes if r not in _BUILDERS]
    if unknown or not runtimes:
        raise ValueError(f"runtimes must name some of {', '.join(RUNTIMES)}, got {runtimes!r}")
    for name, value in (("rounds", rounds), ("calls", calls)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)):
        raise ValueError(f"threads must be an int >= 1 or None, got {threads!r}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be an int >= 1 or None, got {threads!r}")
    n_threads = torch.get_num_threads() if threads is None else threads
    if not _quantizes_inputs(quantized):
        reason = (
            "weight-only quantization: every runtime dequantizes the weights to float, so "
            "int8 saves memory here, not time"
        )
        logger.info("int8 runtimes not timed (%s)", reason)
        return {
            name: RuntimeTiming(name, int(example.shape[0]), n_threads, skipped=reason)
            for name in runtimes
        }
    fp32 = copy.deepcopy(reference).cpu().eval()
    int8 = copy.deepcopy(quantized).cpu().eval()
    x = example.detach().cpu().float().contiguous()
    with torch.inference_mode():
        eager = int8(x)
    out: dict[str, RuntimeTiming] = {}
    for name in runtimes:
        base = RuntimeTiming(runtime=name, batch=int(x.shape[0]), threads=n_threads)
        try:
            with cpu_threads(n_threads):
                built = _BUILDERS[name](fp32, int8, x, n_threads, calibration)
            fast_fp32, fast_int8, kernels = built
        except Exception as exc:  # ONNX Runtime's own errors derive from Exception only
            if not isinstance(exc, ImportError | RuntimeError | ValueError | OSError) and not (
                is_onnxruntime_error(exc)
            ):
                raise
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            logger.warning("int8 in %s not timed (%s)", name, reason)
            out[name] = dataclasses.replace(base, skipped=reason)
            continue
        if not kernels:
            reason = f"{name} runs no int8 kernel for this model"
            logger.warning("int8 in %s not timed (%s)", name, reason)
            out[name] = dataclasses.replace(base, skipped=reason)
            continue
        with cpu_threads(n_threads), torch.inference_mode():
            diff = float((fast_int8(x).float() - eager.float()).abs().max())
        check = layer_speedup(
            fast_fp32, fast_int8, tuple(x.shape), device="cpu", threads=n_threads,
            repeats=rounds, calls=calls,
        )  # fmt: skip
        out[name] = dataclasses.replace(
            base,
            fp32_s=check.original_s,
            int8_s=check.factorised_s,
            speedup=check.speedup,
            rounds=check.rounds,
            faster_rounds=check.faster_rounds,
            int8_kernels=kernels,
            max_abs_diff=diff,
        )
        logger.info(
            "int8 in %s: %.3f -> %.3f ms (%.2fx), batch %d, %d thread(s)",
            name, check.original_s * 1e3, check.factorised_s * 1e3, check.speedup,
            x.shape[0], n_threads,
        )  # fmt: skip
    if "inductor" in runtimes:
        torch._dynamo.reset()  # the compiled graphs would count against later recompile limits
    return out
