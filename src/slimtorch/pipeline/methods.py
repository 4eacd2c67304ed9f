"""Compression methods of the compress pipeline, registered by name.

Each method turns a trained model into a compressed one in place and says what fine-tuning
should do with it. :func:`~slimtorch.pipeline.compress.compress_run` measures before and after,
applies the method, fine-tunes with the callbacks it asks for, runs its ``finish`` step and
writes the report. Registering a method here is all that makes it reachable from
``slimtorch compress --method NAME``.

A method is a function ``(model, request) -> Applied``. The :class:`MethodRequest` carries the
method's config fields as plain values (``config`` fields), the layer globs and an example input;
the :class:`Applied` it returns holds the JSON report, a printable table, whether anything
changed, the training callbacks the fine-tune needs (masks kept exact, gradual schedules, QAT)
and an optional ``finish`` step run after fine-tuning (e.g. converting to int8).

Example:
    >>> sorted(COMPRESS_METHODS.names())[:3]
    ['cp', 'nm', 'prune']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtorch.core.registry import Registry
from slimtorch.train import Callback


@dataclasses.dataclass
class MethodRequest:
    """What the pipeline hands a method.

    Attributes:
        options: Fields of the method's config (``{"rank": 0.25}``, ``{"sparsity": 0.9}``).
        include: Dotted-name globs of the layers to consider (all when None).
        exclude: Dotted-name globs to leave alone.
        strict: Raise instead of recording skips.
        example_input: A batch on the model's device, for tracing and speed checks.
        calibration: Returns an iterable of ``(inputs, targets)`` training batches on the
            device (for methods that calibrate or score with data); None when unavailable.
        finetune_steps: Optimiser steps the fine-tune will run (0 when it is skipped).
        steps_per_epoch: Optimiser steps per fine-tuning epoch (0 when it is skipped).
    """

    options: dict[str, Any]
    include: Sequence[str] | None = None
    exclude: Sequence[str] | None = None
    strict: bool = False
    example_input: torch.Tensor | None = None
    calibration: Callable[[], Iterable[Any]] | None = None
    finetune_steps: int = 0
    steps_per_epoch: int = 0


@dataclasses.dataclass
class Applied:
    """What a method did.

    Attributes:
        config: The resolved config as a dict (saved in ``report.json``).
        report: The per-layer report as a JSON-ready dict.
        table: The per-layer report as text.
        changed: Whether the model changed (no fine-tuning when it did not).
        callbacks: Training callbacks the fine-tune must run with.
        finish: Run after fine-tuning (or right away when there is none); returns extra
            report entries (or None) and may change the model again.
        artifacts: Run after the model directory is written, with the run directory;
            writes extra files (e.g. compact weights) and returns report entries.
        trainable: Whether the changed model can be fine-tuned (False for post-training
            quantization and casts: the result is meant to be deployed as it is).
    """

    config: dict[str, Any]
    report: dict[str, Any]
    table: str
    changed: bool
    callbacks: list[Callback] = dataclasses.field(default_factory=list)
    finish: Callable[[nn.Module], dict[str, Any] | None] | None = None
    artifacts: Callable[[nn.Module, Path], dict[str, Any]] | None = None
    trainable: bool = True


CompressMethod = Callable[[nn.Module, MethodRequest], Applied]

COMPRESS_METHODS: Registry[CompressMethod] = Registry("compression method")


def _decompose(method: str) -> CompressMethod:
    def apply(model: nn.Module, request: MethodRequest) -> Applied:
        from slimtorch.decompose import CPConfig, SVDConfig, TTConfig, TuckerConfig, decompose_
        from slimtorch.decompose.config import DecomposeConfig

        config_type: dict[str, type[DecomposeConfig]] = {
            "svd": SVDConfig,
            "tucker": TuckerConfig,
            "cp": CPConfig,
            "tt": TTConfig,
        }
        config = config_type[method].from_dict(request.options)
        report = decompose_(
            model,
            config,
            include=request.include,
            exclude=request.exclude,
            strict=request.strict,
            example_input=request.example_input,
        )
        return Applied(
            config=config.to_dict(),
            report=report.to_dict(),
            table=report.to_table(),
            changed=any(r.action == "decomposed" for r in report.rows),
        )

    apply.__doc__ = f"Low-rank factorisation by {method} (slimtorch.decompose)."
    return apply


for _name in ("svd", "tucker", "cp", "tt"):
    COMPRESS_METHODS.register(_name)(_decompose(_name))


def _compact_sizes(model: nn.Module) -> dict[str, int]:
    """Bytes of the state dict dense and in the smallest compact encoding."""
    from slimtorch.prune import compact_state_dict

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    compact = compact_state_dict(state)
    dense = sum(v.numel() * v.element_size() for v in state.values())
    packed = sum(v.numel() * v.element_size() for v in compact.values())
    return {"dense_bytes": dense, "compact_bytes": packed}


COMPACT_FILE = "model.compact.safetensors"
"""Compact weights written beside ``model/`` by the pruning methods."""


def _write_compact(model: nn.Module, out_dir: Path) -> dict[str, Any]:
    """Write the compact weights file and compare its size with the model's dense file."""
    from slimtorch.prune import save_compact

    path = save_compact(
        {k: v.detach().cpu() for k, v in model.state_dict().items()}, out_dir / COMPACT_FILE
    )
    dense = sum(f.stat().st_size for f in (out_dir / "model").glob("*.safetensors"))
    return {
        "compact_file": COMPACT_FILE,
        "compact_file_bytes": path.stat().st_size,
        "dense_file_bytes": dense,
    }


@COMPRESS_METHODS.register("prune")
def _prune(model: nn.Module, request: MethodRequest) -> Applied:
    """Unstructured magnitude pruning, one-shot or gradual (``gradual=True``).

    One-shot prunes now and keeps the masks exact while fine-tuning (Han et al. 2015,
    arXiv:1506.02626); gradual adds all-true masks now and raises sparsity on the Zhu & Gupta
    2017 schedule (arXiv:1710.01878) over the first two thirds of the fine-tune.
    """
    from slimtorch.prune import GradualPruning, MagnitudeConfig, MaskCallback, prune_

    options = dict(request.options)
    gradual = bool(options.pop("gradual", False))
    config = MagnitudeConfig.from_dict(options)
    inc, exc = request.include, request.exclude
    callbacks: list[Callback]
    if gradual and request.finetune_steps > 0:
        start = dataclasses.replace(config, sparsity=0.0)
        report = prune_(model, start, include=inc, exclude=exc, strict=request.strict)
        end = max(0, (2 * request.finetune_steps) // 3 - 1)
        freq = max(1, request.steps_per_epoch // 4)
        callbacks = [GradualPruning(config, 0, end, freq, include=inc, exclude=exc)]
    else:
        report = prune_(model, config, include=inc, exclude=exc, strict=request.strict)
        callbacks = [MaskCallback()]

    def finish(m: nn.Module) -> dict[str, Any]:
        final = prune_(m, config, include=inc, exclude=exc)  # exact target (no-op if reached)
        return {"final_layers": final.to_dict(), "storage": _compact_sizes(m)}

    return Applied(
        config={**config.to_dict(), "gradual": gradual},
        report=report.to_dict(),
        table=report.to_table(),
        changed=bool(report.pruned),
        callbacks=callbacks,
        finish=finish,
        artifacts=_write_compact,
    )


@COMPRESS_METHODS.register("nm")
def _nm(model: nn.Module, request: MethodRequest) -> Applied:
    """N:M semi-structured magnitude pruning (2:4 by default), masks kept while fine-tuning."""
    from slimtorch.prune import MaskCallback, NMConfig, prune_

    config = NMConfig.from_dict(request.options)
    report = prune_(
        model, config, include=request.include, exclude=request.exclude, strict=request.strict
    )
    return Applied(
        config=config.to_dict(),
        report=report.to_dict(),
        table=report.to_table(),
        changed=bool(report.pruned),
        callbacks=[MaskCallback()],
        finish=lambda m: {"storage": _compact_sizes(m)},
        artifacts=_write_compact,
    )


@COMPRESS_METHODS.register("channel-prune")
def _channel_prune(model: nn.Module, request: MethodRequest) -> Applied:
    """Structured channel pruning through the dependency graph (dense, smaller layers).

    Taylor importance scores channels on training batches (Molchanov et al. 2019,
    arXiv:1906.10771); the other importances need no data.
    """
    from slimtorch.prune import ChannelPruneConfig, prune_channels_

    config = ChannelPruneConfig.from_dict(request.options)
    needs_data = config.importance == "taylor"
    calibration = request.calibration() if needs_data and request.calibration else None
    report = prune_channels_(
        model,
        config,
        request.example_input,
        include=request.include,
        exclude=request.exclude,
        strict=request.strict,
        calibration=calibration,
    )
    return Applied(
        config=config.to_dict(),
        report=report.to_dict(),
        table=report.to_table(),
        changed=bool(report.pruned),
    )


def _batches(request: MethodRequest, what: str) -> Iterable[Any]:
    if request.calibration is None:
        raise ValueError(f"{what} needs training batches; none were given")
    return request.calibration()


EAGER_NOTE = (
    "latency measured here runs the Q/DQ model eagerly (int8 simulated in float); the int8 "
    "kernels run through slimtorch.quant.compile_int8_x86 or ONNX Runtime "
    "(slimtorch export --format onnx)"
)


@COMPRESS_METHODS.register("ptq")
def _ptq(model: nn.Module, request: MethodRequest) -> Applied:
    """Post-training int8 quantization (weight-only, dynamic or static with calibration)."""
    from slimtorch.quant import PTQConfig, quantize_

    config = PTQConfig.from_dict(request.options)
    calibration = _batches(request, "static PTQ") if config.mode == "static" else None
    report = quantize_(
        model,
        config,
        calibration=calibration,
        include=request.include,
        exclude=request.exclude,
        strict=request.strict,
    )
    return Applied(
        config=config.to_dict(),
        report=report.to_dict(),
        table=report.to_table(),
        changed=True,
        trainable=False,
        finish=lambda m: {"note": EAGER_NOTE},
    )


@COMPRESS_METHODS.register("qat")
def _qat(model: nn.Module, request: MethodRequest) -> Applied:
    """LSQ quantization-aware fine-tuning (Esser et al. 2020, arXiv:1902.08153), then int8.

    The fine-tune trains the fake-quantized model with learned step sizes; ``finish`` converts
    it to the same Q/DQ int8 model as post-training quantization.
    """
    from slimtorch.quant import QATCallback, QATConfig, convert_qat_, prepare_qat_

    options = dict(request.options)
    if request.include is not None:
        options.setdefault("include", list(request.include))
    if request.exclude is not None:
        options.setdefault("exclude", list(request.exclude))
    widen = bool(options.pop("widen_4bit_activations", False))
    config = QATConfig.from_dict(options)
    report = prepare_qat_(model, config)

    def finish(m: nn.Module) -> dict[str, Any]:
        converted = convert_qat_(m, widen_4bit_activations=widen)
        return {"converted": converted.to_dict(), "note": EAGER_NOTE}

    return Applied(
        config={**config.to_dict(), "widen_4bit_activations": widen},
        report=report.to_dict(),
        table=report.to_table(),
        changed=True,
        callbacks=[QATCallback(config)],
        finish=finish,
    )


def _cast(dtype: str) -> CompressMethod:
    def apply(model: nn.Module, request: MethodRequest) -> Applied:
        from slimtorch.quant import LowPrecisionConfig, cast_

        options = {"dtype": dtype, **request.options}
        profile = options.pop("profile", "rx580")
        check = options.pop("check_batches", 4)
        config = LowPrecisionConfig.from_dict(options)
        batches = []
        for i, batch in enumerate(_batches(request, f"the {dtype} accuracy check")):
            if i >= check:
                break
            batches.append(batch)
        report = cast_(model, config, check_inputs=batches, device_profile=profile)
        return Applied(
            config={**config.to_dict(), "profile": profile, "check_batches": check},
            report=report.to_dict(),
            table=report.to_table(),
            changed=True,
            trainable=False,
        )

    apply.__doc__ = f"Cast to {dtype} with keep-in-fp32 rules and an accuracy check."
    return apply


@COMPRESS_METHODS.register("fold-bn")
def _fold_bn(model: nn.Module, request: MethodRequest) -> Applied:
    """Fold every Conv2d -> BatchNorm2d pair into the convolution (exact in eval mode).

    A deployment step: on an H100 cuDNN's eager batch-norm inference kernel took 54% of
    vgg11-bn's forward time at batch 4096 (docs/benchmarks.md); folded, the kernel is gone.
    """
    from slimtorch.quant import fold_bn_

    if request.options:
        raise ValueError(f"fold-bn takes no options, got {sorted(request.options)}")
    model.eval()
    report = fold_bn_(model, include=request.include, exclude=request.exclude)
    return Applied(
        config={},
        report=report.to_dict(),
        table=report.to_table(),
        changed=bool(report.folded),
        trainable=False,
    )


COMPRESS_METHODS.register("fp16")(_cast("fp16"))
COMPRESS_METHODS.register("bf16")(_cast("bf16"))


@COMPRESS_METHODS.register("mixed")
def _mixed(model: nn.Module, request: MethodRequest) -> Applied:
    """Per-layer precision from {fp16, int8, int4 weights} under a size or latency budget."""
    from slimtorch.quant import MixedPrecisionConfig, mixed_precision_

    options = dict(request.options)
    if request.include is not None:
        options.setdefault("include", list(request.include))
    if request.exclude is not None:
        options.setdefault("exclude", list(request.exclude))
    config = MixedPrecisionConfig.from_dict(options)
    report = mixed_precision_(model, config, _batches(request, "mixed precision"))
    return Applied(
        config=config.to_dict(),
        report=report.to_dict(),
        table=report.to_table(),
        changed=True,
        trainable=False,
        finish=lambda m: {"note": EAGER_NOTE},
    )
