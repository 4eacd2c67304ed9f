"""The quantization and deployment methods of the compress pipeline.

``ptq`` (post-training int8), ``qat`` (LSQ fine-tuning, then int8), ``fp16``/``bf16`` (casts with an
accuracy check), ``fold-bn`` (batch norms folded into convolutions), ``direct-conv`` (stems
fused with their pooling for compiled inference), ``conv-gemm`` (convolutions as im2col + linear
for small-batch compiled CPU inference) and ``mixed`` (per-layer precision under a budget). They
register into :data:`~slimtorch.pipeline.methods.COMPRESS_METHODS` when
:mod:`slimtorch.pipeline.methods` is imported; the shapes of a method and of its request and
result are described there.

Example:
    >>> from slimtorch.pipeline.methods import COMPRESS_METHODS, check_options
    >>> sorted(n for n in COMPRESS_METHODS.names() if n in ("ptq", "qat", "mixed"))
    ['mixed', 'ptq', 'qat']
    >>> check_options("ptq", {"mode": "static"})
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from slimtorch.core.table import text_table
from slimtorch.pipeline.methods import (
    COMPRESS_METHODS,
    Applied,
    CompressMethod,
    MethodRequest,
    OptionParser,
    _config_from,
    _parses_options,
    _pop_flag,
)
from slimtorch.pipeline.side_by_side import compiled_side_by_side


def _batches(request: MethodRequest, what: str) -> Iterable[Any]:
    if request.calibration is None:
        raise ValueError(f"{what} needs training batches; none were given")
    return request.calibration()


EAGER_NOTE = (
    "the eager latency row runs the Q/DQ model with int8 simulated in float; its int8 kernels "
    "run in the runtimes under 'runtimes' (slimtorch.quant.compile_int8_x86, ONNX Runtime "
    "through slimtorch export --format onnx), timed there against the float model"
)

RUNTIME_CHECK = "runtime_check"
"""Option of the int8 methods (default on): time the result in the int8 runtimes."""

CALIBRATION_BATCHES = 8
"""Training batches the ONNX Runtime export of the runtime check calibrates added outputs on."""


def _runtime_check(options: dict[str, Any], method: str) -> tuple[bool, dict[str, Any]]:
    return _pop_flag(options, method, RUNTIME_CHECK, default=True)


def _float_copy(model: nn.Module, request: MethodRequest, check: bool) -> nn.Module | None:
    """The float model kept for the runtime check (taken before the method changes it)."""
    x = request.example_input
    if not check or not isinstance(x, torch.Tensor) or x.device.type != "cpu":
        return None
    return copy.deepcopy(model).eval()


def _cuda_int8_hint(m: nn.Module, x: Any) -> str:
    """A pointer to :func:`~slimtorch.quant.torchao_cuda_` where it would run: the model has
    Linear layers and ``x``'s GPU an int8 GEMM (not every GPU has one: not the RX 580)."""
    from slimtorch.quant import QDQLinear
    from slimtorch.quant.runtime import int_mm_problem

    if not isinstance(x, torch.Tensor) or x.device.type != "cuda":
        return ""
    if not any(isinstance(layer, nn.Linear | QDQLinear) for layer in m.modules()):
        return ""
    if int_mm_problem(x.device) is not None:
        return ""
    return " (torchao_cuda_ runs the float model's Linear layers in int8 on this GPU)"


def _int8_report(
    m: nn.Module, request: MethodRequest, before: nn.Module | None, check: bool
) -> dict[str, Any]:
    """The int8 methods' finishing report: the note on eager timing and, with ``check``, the
    int8 model ``m`` timed against ``before`` in each int8 CPU runtime
    (:func:`~slimtorch.quant.time_int8_runtimes`; a runtime that cannot run it says why)."""
    from slimtorch.quant import time_int8_runtimes
    from slimtorch.quant.export import is_qdq_model
    from slimtorch.train.distributed import is_main_process

    out: dict[str, Any] = {"note": EAGER_NOTE}
    x = request.example_input
    if not check:
        return out
    if not is_main_process():  # one timing per machine: ranks would compete for its cores
        out["runtimes_skipped"] = "timed by the main process only"
        return out
    if not is_qdq_model(m):
        out["runtimes_skipped"] = "no layer holds int8 weights: nothing to time in an int8 runtime"
        return out
    if before is None or not isinstance(x, torch.Tensor):
        where = x.device if isinstance(x, torch.Tensor) else "no example batch"
        out["runtimes_skipped"] = (
            f"the int8 runtimes timed here run on the CPU and this run measured on {where}; "
            f"compress with --device cpu to time them{_cuda_int8_hint(m, x)}"
        )
        return out
    calib = []
    if request.calibration is not None:
        for i, batch in enumerate(request.calibration()):
            if i >= CALIBRATION_BATCHES:
                break
            inputs = batch[0] if isinstance(batch, tuple | list) else batch
            calib.append(inputs.detach().cpu())
    timings = time_int8_runtimes(before, m, x, threads=request.threads, calibration=calib or None)
    out["runtimes"] = {name: t.to_dict() for name, t in timings.items()}
    inductor = timings.get("inductor")
    timed = inductor is not None and inductor.skipped is None
    if timed and x.shape[0] <= GEMM_HINT_BATCH and _gemm_candidates(before):
        out["hint"] = GEMM_HINT
    return out


GEMM_HINT_BATCH = 8
"""Largest batch at which the report points to the im2col + linear layout."""

GEMM_HINT = (
    "at small batches, convolutions as im2col + linear (slimtorch compress --method conv-gemm, "
    "then ptq) can run int8 as inductor's own GEMM kernels, which skip oneDNN's per-call cost; "
    "conv-gemm times both layouts on your batch"
)


def _gemm_candidates(model: nn.Module) -> bool:
    """Whether ``model`` has convolutions ``lower_conv_gemm_`` would take and none lowered."""
    from slimtorch.quant import GemmConvConfig
    from slimtorch.quant.runtime import wants_max_autotune

    min_k = GemmConvConfig().min_k
    return not wants_max_autotune(model) and any(
        isinstance(c, nn.Conv2d)
        and c.in_channels // c.groups * c.kernel_size[0] * c.kernel_size[1] >= min_k
        for c in model.modules()
    )


@_parses_options("ptq")
def _ptq_options(options: dict[str, Any]) -> tuple[bool, Any]:
    from slimtorch.quant import PTQConfig

    check, rest = _runtime_check(options, "ptq")
    return check, _config_from(PTQConfig, rest, "ptq", RUNTIME_CHECK)


@COMPRESS_METHODS.register("ptq")
def _ptq(model: nn.Module, request: MethodRequest) -> Applied:
    """Post-training int8 quantization (weight-only, dynamic or static with calibration).

    With ``runtime_check`` (default on; on the CPU) the report adds the int8 model timed against
    the float one in inductor and ONNX Runtime (``runtimes``): run eagerly, int8 is only
    simulated and is slower than float.
    """
    from slimtorch.quant import quantize_

    check, config = _ptq_options(request.options)
    calibration = _batches(request, "static PTQ") if config.mode == "static" else None
    before = _float_copy(model, request, check)
    report = quantize_(
        model,
        config,
        calibration=calibration,
        include=request.include,
        exclude=request.exclude,
        strict=request.strict,
    )
    return _simulated_int8(config, report, request, before, check)


def _simulated_int8(
    config: Any, report: Any, request: MethodRequest, before: nn.Module | None, check: bool
) -> Applied:
    """What ptq and mixed return: a deployable model whose int8 runs simulated here, timed in
    the int8 runtimes by its ``finish`` step."""
    # an int8 input: every layer skipped, nothing changed to time int8 against
    changed = bool(getattr(report, "quantized", True)) or bool(
        getattr(report, "info", {}).get("folded_bn")
    )
    return Applied(
        config={**config.to_dict(), RUNTIME_CHECK: check},
        report=report.to_dict(),
        table=report.to_table(),
        changed=changed,
        trainable=False,
        finish=(lambda m: _int8_report(m, request, before, check)) if changed else None,
    )


def _with_globs(request: MethodRequest) -> dict[str, Any]:
    """The options with the request's layer globs as ``include``/``exclude`` config fields."""
    options = dict(request.options)
    if request.include is not None:
        options.setdefault("include", list(request.include))
    if request.exclude is not None:
        options.setdefault("exclude", list(request.exclude))
    return options


@_parses_options("qat")
def _qat_options(options: dict[str, Any]) -> tuple[bool, bool, Any]:
    from slimtorch.quant import QATConfig

    widen, rest = _pop_flag(options, "qat", "widen_4bit_activations")
    check, rest = _runtime_check(rest, "qat")
    config = _config_from(QATConfig, rest, "qat", "widen_4bit_activations", RUNTIME_CHECK)
    if config.act_bits == 4 and not widen:  # the conversion after the fine-tune would refuse it
        raise ValueError(
            "qat with act_bits=4 converts to int8 only with --set widen_4bit_activations=true "
            "(an 8-bit grid on the learned step); train with act_bits=8 for a deployable model"
        )
    return widen, check, config


@COMPRESS_METHODS.register("qat")
def _qat(model: nn.Module, request: MethodRequest) -> Applied:
    """LSQ quantization-aware fine-tuning (Esser et al. 2020, arXiv:1902.08153), then int8.

    The fine-tune trains the fake-quantized model with learned step sizes; ``finish`` converts
    it to the same Q/DQ int8 model as post-training quantization.
    """
    from slimtorch.quant import QATCallback, convert_qat_, prepare_qat_

    widen, check, config = _qat_options(_with_globs(request))
    before = _float_copy(model, request, check)
    report = prepare_qat_(model, config)

    def finish(m: nn.Module) -> dict[str, Any]:
        converted = convert_qat_(m, widen_4bit_activations=widen)
        return {"converted": converted.to_dict(), **_int8_report(m, request, before, check)}

    return Applied(
        config={**config.to_dict(), "widen_4bit_activations": widen, RUNTIME_CHECK: check},
        report=report.to_dict(),
        table=report.to_table(),
        changed=True,
        callbacks=[QATCallback(config)],
        finish=finish,
    )


def _cast_options(dtype: str) -> OptionParser:
    def parse(options: dict[str, Any]) -> tuple[str, int, bool, Any]:
        from slimtorch.core.profiles import get_profile
        from slimtorch.quant import LowPrecisionConfig

        fold, options = _pop_flag(options, dtype, "fold_bn", default=True)
        if options.get("dtype", dtype) != dtype:
            raise ValueError(
                f"method {dtype} casts to {dtype}; got the option dtype={options['dtype']!r} "
                "(choose the dtype by the method: --method fp16 or --method bf16)"
            )
        options = {**options, "dtype": dtype}
        profile = options.pop("profile", "rx580")
        check = options.pop("check_batches", 4)
        if isinstance(check, bool) or not isinstance(check, int) or check < 1:
            raise ValueError(f"{dtype} option 'check_batches' must be an int >= 1, got {check!r}")
        get_profile(profile)  # unknown names raise with the list
        config = _config_from(
            LowPrecisionConfig, options, dtype, "fold_bn", "profile", "check_batches"
        )
        return profile, check, fold, config

    return parse


def _cast(dtype: str) -> CompressMethod:
    parse = _parses_options(dtype)(_cast_options(dtype))

    def apply(model: nn.Module, request: MethodRequest) -> Applied:
        from slimtorch.quant import cast_, fold_bn_

        profile, check, fold, config = parse(request.options)
        batches = []
        for i, batch in enumerate(_batches(request, f"the {dtype} accuracy check")):
            if i >= check:
                break
            batches.append(batch)
        folded = None
        if fold:  # no float32 batch-norm islands, so no cast kernels around them
            model.eval()
            folded = fold_bn_(model, include=request.include, exclude=request.exclude)
        report = cast_(model, config, check_inputs=batches, device_profile=profile)
        out = report.to_dict()
        if folded is not None:
            out["fold_bn"] = folded.to_dict()
        table = report.to_table()
        if folded is not None:
            table = f"batch norms folded first: {len(folded.folded)}\n{table}"
        return Applied(
            config={
                **config.to_dict(),
                "profile": profile,
                "check_batches": check,
                "fold_bn": fold,
            },
            report=out,
            table=table,
            changed=True,
            trainable=False,
        )

    apply.__doc__ = (
        f"Cast to {dtype} with keep-in-fp32 rules and an accuracy check.\n\n"
        "With ``fold_bn`` (default on) the batch norms that follow convolutions are folded first "
        "(exact in eval mode): kept in float32 they cost a cast kernel on each side, which made "
        "resnet20 0.58x as fast as float32 on an H100 at batch 256 against 0.97x folded, and "
        "slower on the rx580 estimate (docs/benchmarks.md)."
    )
    return apply


@_parses_options("fold-bn")
def _fold_bn_options(options: dict[str, Any]) -> None:
    if options:
        raise ValueError(f"fold-bn takes no options, got {sorted(options)}")


@COMPRESS_METHODS.register("fold-bn")
def _fold_bn(model: nn.Module, request: MethodRequest) -> Applied:
    """Fold every Conv2d -> BatchNorm2d pair into the convolution (exact in eval mode).

    A deployment step: on an H100 cuDNN's eager batch-norm inference kernel took 54% of
    vgg11-bn's forward time at batch 4096 (docs/benchmarks.md); folded, the kernel is gone.
    """
    from slimtorch.quant import fold_bn_

    _fold_bn_options(request.options)
    model.eval()
    report = fold_bn_(model, include=request.include, exclude=request.exclude)
    return Applied(
        config={},
        report=report.to_dict(),
        table=report.to_table(),
        changed=bool(report.folded),
        trainable=False,
    )


@_parses_options("direct-conv")
def _direct_conv_options(options: dict[str, Any]) -> tuple[bool, Any]:
    from slimtorch.quant import DirectConvConfig

    compiled, rest = _pop_flag(options, "direct-conv", "compiled_check", default=True)
    return compiled, _config_from(DirectConvConfig, rest, "direct-conv", "compiled_check")


@COMPRESS_METHODS.register("direct-conv")
def _direct_conv(model: nn.Module, request: MethodRequest) -> Applied:
    """Few-tap convolutions (stems) as direct sums, with their batch norm, ReLU and max-pool.

    A deployment step for compiled inference: on an H100 vgg11-bn's compiled forward at batch
    4096 went from 4.81 to 3.59 ms (docs/benchmarks.md). Eagerly the lowered stem is slower, so
    the pipeline's (eager) before/after latency does not tell whether it pays; with
    ``compiled_check`` (default on) the report adds both models compiled and timed side by side
    on the example batch, on the device at hand (``compiled_latency``).
    """
    from slimtorch.quant import lower_direct_conv_

    compiled, config = _direct_conv_options(request.options)
    model.eval()
    x = request.example_input
    before = copy.deepcopy(model) if compiled and isinstance(x, torch.Tensor) else None
    report = lower_direct_conv_(
        model, config, include=request.include, exclude=request.exclude, strict=request.strict
    )

    def finish(m: nn.Module) -> dict[str, Any] | None:
        if before is None or not report.lowered:
            return None
        assert isinstance(x, torch.Tensor)
        return compiled_side_by_side(before, m, x, max_autotune=False)

    config_dict = {**config.to_dict(), "compiled_check": compiled}
    return Applied(
        config=config_dict,
        report=report.to_dict(),
        table=report.to_table(),
        changed=bool(report.lowered),
        finish=finish,
        trainable=False,
    )


@_parses_options("conv-gemm")
def _conv_gemm_options(options: dict[str, Any]) -> tuple[bool, bool, Any]:
    from slimtorch.quant import GemmConvConfig

    compiled, rest = _pop_flag(options, "conv-gemm", "compiled_check", default=True)
    direct, rest = _pop_flag(rest, "conv-gemm", "direct_stem", default=True)
    own = ("compiled_check", "direct_stem")
    return compiled, direct, _config_from(GemmConvConfig, rest, "conv-gemm", *own)


@COMPRESS_METHODS.register("conv-gemm")
def _conv_gemm(model: nn.Module, request: MethodRequest) -> Applied:
    """Convolutions as im2col + linear for small-batch compiled CPU inference (then ``ptq``).

    With ``direct_stem`` (default on) the few-tap stem becomes a channels-last direct
    convolution first (``direct-conv``), the rest im2col + linear (``lower_conv_gemm_``). On
    an AVX-512/AMX CPU with one thread, resnet20's int8 forward at batch 1 then runs 2.4x
    faster than the same rewritten fp32 model (1.1-1.2x as convolutions; 2.2x on an AVX-512
    VNNI CPU without AMX); at batch 32 the
    rewrite is slower than oneDNN's convolutions (docs/benchmarks.md). So it is a choice for
    the batch you serve: ``compiled_check`` (default on) adds both models compiled with
    ``max_autotune`` and timed side by side on the example batch (``compiled_latency``).
    """
    from slimtorch.quant import DirectConvConfig, lower_conv_gemm_, lower_direct_conv_

    compiled, direct_stem, config = _conv_gemm_options(request.options)
    model.eval()
    x = request.example_input
    before = copy.deepcopy(model) if compiled and isinstance(x, torch.Tensor) else None
    direct = None
    if direct_stem:
        direct = lower_direct_conv_(
            model,
            DirectConvConfig(channels_last=True),
            include=request.include,
            exclude=request.exclude,
        )
    report = lower_conv_gemm_(
        model, config, include=request.include, exclude=request.exclude, strict=request.strict
    )
    changed = bool(report.lowered) or bool(direct and direct.lowered)
    # one row per convolution, with what it finally became: the direct step's skips are the
    # layers the GEMM step then considered
    final: list[tuple[str, str, str | None]] = [
        (r.conv, r.action, r.reason) for r in (direct.lowered if direct else [])
    ] + [(r.conv, r.action, r.reason) for r in report.rows]
    layers = [{"conv": c, "action": a, "reason": why} for c, a, why in final]
    out = {
        "layers": layers,
        "gemm": report.to_dict(),
        "direct": direct.to_dict() if direct else None,
    }
    table = text_table([("conv", "action", "reason"), *((c, a, why or "") for c, a, why in final)])

    def finish(m: nn.Module) -> dict[str, Any] | None:
        if before is None or not changed:
            return None
        assert isinstance(x, torch.Tensor)
        return compiled_side_by_side(before, m, x, max_autotune=True)

    return Applied(
        config={**config.to_dict(), "compiled_check": compiled, "direct_stem": direct_stem},
        report=out,
        table=table,
        changed=changed,
        finish=finish,
        trainable=False,
    )


COMPRESS_METHODS.register("fp16")(_cast("fp16"))
COMPRESS_METHODS.register("bf16")(_cast("bf16"))


@_parses_options("mixed")
def _mixed_options(options: dict[str, Any]) -> tuple[bool, Any]:
    from slimtorch.quant import MixedPrecisionConfig

    check, rest = _runtime_check(options, "mixed")
    return check, _config_from(MixedPrecisionConfig, rest, "mixed", RUNTIME_CHECK)


@COMPRESS_METHODS.register("mixed")
def _mixed(model: nn.Module, request: MethodRequest) -> Applied:
    """Per-layer precision from {fp16, int8, int4 weights} under a size or latency budget."""
    from slimtorch.quant import mixed_precision_

    check, config = _mixed_options(_with_globs(request))
    before = _float_copy(model, request, check)
    report = mixed_precision_(model, config, _batches(request, "mixed precision"))
    return _simulated_int8(config, report, request, before, check)
