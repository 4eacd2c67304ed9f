"""Int8 runtimes: x86 CPUs through inductor + oneDNN, CUDA through torchao, and kernel checks.

**x86 (PyTorch path).** :func:`compile_int8_x86` compiles a Q/DQ model with ``torch.compile``
and inductor *freezing*. Freezing turns the int8 weights into constants, and torchao's X86
inductor passes (registered by importing ``torchao.quantization.pt2e.quantizer.
x86_inductor_quantizer``; torch >= 2.10 no longer registers them itself) rewrite each
``dequantize_per_tensor -> conv/linear(dequantize_per_channel(int8 weight))`` pattern into
oneDNN ``onednn.qconv_pointwise`` / ``onednn.qlinear_pointwise`` calls with prepacked int8
weights, fusing a following ReLU and output ``quantize_per_tensor``. oneDNN uses AVX512-VNNI
or AMX-INT8 where the CPU has them (``lscpu`` flags ``avx512_vnni``, ``amx_int8``). Freezing
must be on while dynamo traces (``torch._inductor.config.freezing``; the ``options=`` argument
of ``torch.compile`` is too late for it), so the compiled callable turns it on around every call.
:func:`int8_kernels` reads the generated code to say which oneDNN int8 kernels ran.

**Q/DQ placement** per runtime is :mod:`slimtorch.quant.placement`; ``compile_int8_x86``
places its own copy for inductor.

**CUDA.** :func:`torchao_cuda_` applies torchao's int8 weight-only or dynamic-activation
configs to the float ``nn.Linear`` layers (torchao has CUDA int8 kernels for linear layers
only: ``torch._int_mm`` and its weight-only mm; convolutions stay in float).

Example (inductor compiles for several seconds, hence the compile is skipped as a test):
    >>> from slimtorch.models import create_model
    >>> model = create_model("lenet5", in_channels=1, input_size=28).eval()
    >>> batches = [(torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))) for _ in range(2)]
    >>> report = quantize_(model, PTQConfig(mode="static"), calibration=batches)
    >>> x = batches[0][0]
    >>> fast = compile_int8_x86(model, example_input=x)  # doctest: +SKIP
    >>> fast(x).shape  # doctest: +SKIP
    torch.Size([32, 10])
"""

from __future__ import annotations

import copy
import logging
import re
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slimtorch.core.surgery import refuse_sparse_kernels
from slimtorch.quant.placement import QDQ_TARGETS, place_qdq_

logger = logging.getLogger(__name__)

# ``qconv_pointwise`` / ``qlinear_pointwise`` and the conv+add fusion ``qconv2d_pointwise.binary``
_KERNEL_RE = re.compile(r"torch\.ops\.onednn\.(q\w+pointwise(?:\.binary)?)")
# inductor's own C++ kernels, as its wrapper defines them:
# name = async_compile.cpp_pybinding(['arg type', ...], r'''source''')
_CPP_KERNEL_RE = re.compile(
    r"^(\w+) = async_compile\.cpp_pybinding\(\[([^\]]*)\], r'''(.*?)'''", re.M | re.S
)
CPP_INT8_GEMM = "cpp_int8_gemm"
""":func:`kernel_counts`' name for inductor's C++ GEMM template run on int8 weights."""


def cpu_int8_support() -> dict[str, Any]:
    """What this CPU offers for int8: ISA flags, oneDNN availability and PyTorch's CPU level.

    Example:
        >>> cpu_int8_support()["onednn"]
        True
    """
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {
        "onednn": bool(torch.backends.mkldnn.is_available()),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "avx512_vnni": "avx512_vnni" in flags,
        "avx_vnni": "avx_vnni" in flags,
        "amx_int8": "amx_int8" in flags,
    }


_LIFT_UP: list[Any] = []  # torchao's pre-grad pass, applied only while our models compile


def _register_x86_passes() -> None:
    """Import torchao's x86 inductor passes (its int8 lowerings register on import). The import
    also sets inductor's process-wide ``pre_grad_custom_pass``, replacing any of the user's: it
    is put back, and :class:`CompiledInt8` applies torchao's pass to its own compiles only."""
    if _LIFT_UP:
        return
    from torch._inductor import config as inductor_config

    before = inductor_config.pre_grad_custom_pass
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401
    except ImportError as exc:  # pragma: no cover - torchao is a dependency
        raise ImportError(
            f"the x86 int8 path needs torchao ({exc}); install it with "
            "`pip install 'slimtorch[quant]'`"
        ) from None
    _LIFT_UP.append(inductor_config.pre_grad_custom_pass)
    inductor_config.pre_grad_custom_pass = before


class CompiledInt8(nn.Module):
    """A model compiled by :func:`compile_int8_x86`; call it like the model (no grad).

    Attributes:
        model: The eager model it wraps (its weights are frozen into the compiled code).
    """

    def __init__(
        self, model: nn.Module, compiled: Callable[..., Any], *, max_autotune: bool = False
    ) -> None:
        super().__init__()
        self.model = model
        self._compiled = compiled
        self.max_autotune = max_autotune

    def forward(self, *args: Any) -> Any:
        from torch._inductor import config as inductor_config

        _register_x86_passes()
        patch = inductor_config.patch(
            freezing=True, max_autotune=self.max_autotune, pre_grad_custom_pass=_LIFT_UP[0]
        )
        with torch.no_grad(), patch:
            return self._compiled(*args)


def compile_int8_x86(
    model: nn.Module,
    example_input: torch.Tensor | None = None,
    *,
    dynamic: bool = False,
    target: str = "inductor",
    max_autotune: bool | None = None,
) -> CompiledInt8:
    """Compile a (Q/DQ or float) model for the CPU with inductor freezing.

    Q/DQ layers become oneDNN int8 kernels; float layers get inductor's fp32 lowering (so
    compiling the float model this way is the fair fp32 baseline). The model is copied and put
    in eval mode; weights are frozen at the first call (later changes to ``model`` are not
    seen). Each new input shape compiles again unless ``dynamic``. The copy's Q/DQ steps are
    first placed for inductor (:func:`place_qdq_`), so residual adds fuse into the int8
    convolutions; ``model`` itself is not changed.

    Args:
        model: The model, on the CPU.
        example_input: If given, run once to compile now (takes seconds).
        dynamic: Compile for dynamic shapes.
        target: Q/DQ placement applied to the copy (``"portable"``: compile it as it is).
        max_autotune: Let inductor time its own C++ GEMM templates against the library
            kernels (compiles take tens of seconds longer). Needed for the im2col + linear
            layers of :func:`~slimtorch.quant.lower_conv_gemm_`: with it their int8 and fp32
            products run as generated AMX/AVX-512 code instead of oneDNN calls; for
            convolutions it changes nothing measurable. ``None`` (default): on exactly when
            the model holds such layers (:func:`wants_max_autotune`).

    Returns:
        A :class:`CompiledInt8` module.

    Raises:
        ValueError: The model is not on the CPU or holds float64 weights, or ``target`` is
            unknown.

    Example (inductor compiles for several seconds, hence skipped as a test):
        >>> from slimtorch.models import create_model
        >>> qdq_model = create_model("lenet5", in_channels=1, input_size=28).eval()
        >>> calib = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(2)]
        >>> _ = quantize_(qdq_model, PTQConfig(mode="static"), calibration=calib)
        >>> fast = compile_int8_x86(qdq_model, torch.randn(1, 1, 28, 28))  # doctest: +SKIP
        >>> fast(torch.randn(4, 1, 28, 28)).shape  # doctest: +SKIP
        torch.Size([4, 10])
    """
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type != "cpu":
            raise ValueError(
                f"compile_int8_x86 targets x86 CPUs but the model is on {t.device}; move it "
                "with model.cpu() (on CUDA use torchao_cuda_)"
            )
    if target not in QDQ_TARGETS:
        raise ValueError(f"target must be one of {', '.join(QDQ_TARGETS)}, got {target!r}")
    if any(t.dtype == torch.float64 for t in model.parameters()):
        raise ValueError(
            "compile_int8_x86 cannot compile a float64 model (inductor's frozen CPU kernels "
            "take float32, bfloat16 and int8); convert it with model.float() first"
        )
    _register_x86_passes()
    if max_autotune is None:
        max_autotune = wants_max_autotune(model)
    refuse_sparse_kernels(model, "compile_int8_x86")
    work = copy.deepcopy(model).eval()
    place_qdq_(work, target)
    # dynamo keeps one cache per code object: give this copy's forward its own, so compiled
    # copies of one architecture (fp32 and int8, several placements) do not share guards and
    # evict each other past the recompile limit
    fwd = type(work).forward
    own = types.FunctionType(
        fwd.__code__.replace(), fwd.__globals__, fwd.__name__, fwd.__defaults__, fwd.__closure__
    )
    compiled = CompiledInt8(
        work,
        torch.compile(types.MethodType(own, work), dynamic=dynamic),
        max_autotune=max_autotune,
    )
    if example_input is not None:
        compiled(example_input)
    return compiled


def wants_max_autotune(model: nn.Module) -> bool:
    """Whether ``model`` holds im2col + linear convolutions (:func:`~slimtorch.quant.
    lower_conv_gemm_`), which run fast only as inductor's GEMM templates (``max_autotune``).

    Example:
        >>> wants_max_autotune(nn.Sequential(nn.Conv2d(1, 4, 3)))
        False
    """
    from slimtorch.quant.gemm import GemmConv2d

    return any(isinstance(m, GemmConv2d) for m in model.modules())


def int8_kernels(
    model: nn.Module, example_input: torch.Tensor, *, target: str = "inductor"
) -> dict[str, int]:
    """Compile ``model`` for the CPU and count the int8 kernels in the generated code
    (:func:`kernel_counts`).

    Uses a fresh compile (dynamo caches are reset) and reads inductor's output code.

    Returns:
        Kernel name -> number of calls in the compiled forward, e.g.
        ``{"qconv_pointwise": 14, "qconv2d_pointwise.binary": 7, "qlinear_pointwise": 1}``
        (``.binary``: a convolution with the residual add fused; empty: no int8 kernel runs).

    Example (inductor compiles for several seconds, hence skipped as a test):
        >>> from slimtorch.models import create_model
        >>> model = create_model("lenet5", in_channels=1, input_size=28).eval()  # float
        >>> x = torch.randn(1, 1, 28, 28)
        >>> int8_kernels(model, x)  # doctest: +SKIP
        {}
        >>> calib = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(2)]
        >>> _ = quantize_(model, PTQConfig(mode="static"), calibration=calib)
        >>> int8_kernels(model, x)  # doctest: +SKIP
        {'qconv_pointwise': 2, 'qlinear_pointwise': 3}
    """
    from torch._inductor.utils import run_and_get_code

    _register_x86_passes()
    torch._dynamo.reset()
    fast = compile_int8_x86(model, target=target)
    _, codes = run_and_get_code(fast, example_input)
    return kernel_counts(codes)


def kernel_counts(codes: list[str]) -> dict[str, int]:
    """The int8 kernels called in inductor's generated code, and how often each.

    Counts oneDNN's int8 operators by name and, under :data:`CPP_INT8_GEMM`, the calls of
    inductor's own C++ GEMM template on int8 weights: a generated kernel that takes an
    ``int8_t`` weight pointer and runs the template's ``micro_gemm`` (``max_autotune`` picks it
    for the linears of :func:`~slimtorch.quant.lower_conv_gemm_`).

    Example:
        >>> kernel_counts(["buf1 = torch.ops.onednn.qconv_pointwise.default(buf0, ...)"])
        {'qconv_pointwise': 1}
        >>> wrapper = (
        ...     "cpp_fused_addmm_0 = async_compile.cpp_pybinding(['const uint8_t*', "
        ...     "'const int8_t*', 'float*'], r" + "'" * 3 + "void kernel() { micro_gemm(); }"
        ...     + "'" * 3 + ")\\ncpp_fused_addmm_0(buf0, w0, buf1)"
        ...     + "\\ncpp_fused_addmm_0(buf1, w1, buf2)"
        ... )
        >>> kernel_counts([wrapper])
        {'cpp_int8_gemm': 2}
    """
    counts: dict[str, int] = {}
    for code in codes:
        for name in _KERNEL_RE.findall(code):
            counts[name] = counts.get(name, 0) + 1
        for kernel, args, source in _CPP_KERNEL_RE.findall(code):
            if "'const int8_t*'" not in args or "micro_gemm" not in source:
                continue
            calls = len(re.findall(rf"(?<![\w.]){kernel}\(", code))
            if calls:
                counts[CPP_INT8_GEMM] = counts.get(CPP_INT8_GEMM, 0) + calls
    return counts


def int_mm_problem(device: torch.device) -> str | None:
    """Why ``torch._int_mm`` (int8 x int8 -> int32) fails or errs on ``device``, or ``None``.

    PyTorch checks no GPU generation before calling cuBLASLt/hipBLASLt, whose int8 GEMM many
    GPUs lack (hipBLASLt supports only CDNA and RDNA 3 or newer: not the RX 580), so one small
    product is run and checked first.

    Example:
        >>> int_mm_problem(torch.device("cpu")) is None
        True
    """
    a = torch.ones(32, 8, dtype=torch.int8, device=device)
    try:
        out = torch._int_mm(a, torch.ones(8, 8, dtype=torch.int8, device=device))
    except RuntimeError as exc:
        return f"fails on {device}: {str(exc).strip().splitlines()[0]}"
    if not bool((out == 8).all()):
        return f"gives wrong results on {device} (32x8 by 8x8 ones: not all 8)"
    return None


def torchao_cuda_(model: nn.Module, mode: str = "dynamic") -> list[str]:
    """Quantize the ``nn.Linear`` layers of a CUDA model with torchao's int8 kernels, in place.

    ``"weight_only"`` uses ``Int8WeightOnlyConfig`` (int8 weights, float activations, a
    weight-only int8 mm); ``"dynamic"`` uses ``Int8DynamicActivationInt8WeightConfig``
    (per-token int8 activations, ``torch._int_mm``). Convolutions have no torchao int8 CUDA
    kernel and stay in float. This path is runtime-only: save the Q/DQ model instead.

    Returns:
        The names of the Linear layers torchao changed.

    Raises:
        ValueError: ``mode`` is unknown or the model is not on CUDA.

    Example (the CUDA line needs a GPU, hence skipped as a test):
        >>> net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        >>> torchao_cuda_(net.cuda().half(), mode="weight_only")  # doctest: +SKIP
        ['0', '2']
        >>> torchao_cuda_(nn.Linear(4, 2))  # on the CPU: refused
        Traceback (most recent call last):
            ...
        ValueError: torchao_cuda_ needs a model on CUDA, got parameters on ['cpu']; move it ...
    """
    if mode not in ("weight_only", "dynamic"):
        raise ValueError(f"mode must be 'weight_only' or 'dynamic', got {mode!r}")
    devices = {p.device.type for p in model.parameters()}
    if devices != {"cuda"}:
        raise ValueError(
            f"torchao_cuda_ needs a model on CUDA, got parameters on {sorted(devices)}; move "
            "it with model.cuda() (on x86 CPUs use compile_int8_x86)"
        )
    if mode == "dynamic" and (problem := int_mm_problem(next(model.parameters()).device)):
        raise ValueError(
            f"torchao_cuda_(mode='dynamic') runs torch._int_mm (cuBLASLt/hipBLASLt int8 GEMM), "
            f"which {problem}; use mode='weight_only' on this GPU"
        )
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    cfg = (
        Int8WeightOnlyConfig() if mode == "weight_only" else Int8DynamicActivationInt8WeightConfig()
    )
    quantize_(model, cfg)
    logger.info("torchao %s int8 on %d Linear layer(s)", mode, len(names))
    return names
