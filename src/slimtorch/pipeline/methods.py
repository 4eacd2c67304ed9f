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
    >>> sorted(COMPRESS_METHODS.names())[:4]
    ['bf16', 'channel-prune', 'conv-gemm', 'cp']
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from slimtorch.core.config import Config
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
        threads: CPU threads of the pipeline's measurements (None: the current count), for
            methods that time something themselves.
    """

    options: dict[str, Any]
    include: Sequence[str] | None = None
    exclude: Sequence[str] | None = None
    strict: bool = False
    example_input: torch.Tensor | None = None
    calibration: Callable[[], Iterable[Any]] | None = None
    finetune_steps: int = 0
    steps_per_epoch: int = 0
    threads: int | None = None


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

OptionParser = Callable[[dict[str, Any]], Any]
ConfigT = TypeVar("ConfigT", bound=Config)
_OPTION_PARSERS: dict[str, OptionParser] = {}


def _parses_options(*names: str) -> Callable[[OptionParser], OptionParser]:
    """Register the function that turns a method's options into its config (and raises)."""

    def register(parser: OptionParser) -> OptionParser:
        for name in names:
            _OPTION_PARSERS[name] = parser
        return parser

    return register


def check_options(method: str, options: dict[str, Any]) -> None:
    """Parse ``options`` exactly as ``method`` will, without a model or data.

    :func:`~slimtorch.pipeline.compress.compress_run` calls this before it loads anything, so a
    bad rank or sparsity fails at once instead of after the datasets are read and the model
    before compression is measured.

    Raises:
        ValueError: Unknown method or option name (the message lists the valid ones) or a bad
            option value.
        TypeError: An option of the wrong type.

    Example:
        >>> check_options("tucker", {"rank": 0.25})
        >>> check_options("prune", {"sparsity": 1.0})
        Traceback (most recent call last):
        ...
        ValueError: MagnitudeConfig.sparsity must be in [0.0, 1.0), got 1.0
    """
    COMPRESS_METHODS.get(method)
    parser = _OPTION_PARSERS.get(method)
    if parser is not None:
        parser(dict(options))


def _decompose_config(method: str) -> OptionParser:
    def parse(options: dict[str, Any]) -> Any:
        from slimtorch.decompose import CPConfig, SVDConfig, TTConfig, TuckerConfig
        from slimtorch.decompose.config import DecomposeConfig

        config_type: dict[str, type[DecomposeConfig]] = {
            "svd": SVDConfig,
            "tucker": TuckerConfig,
            "cp": CPConfig,
            "tt": TTConfig,
        }
        return config_type[method].from_dict(options)

    return parse


def _decompose(method: str) -> CompressMethod:
    parse = _parses_options(method)(_decompose_config(method))

    def apply(model: nn.Module, request: MethodRequest) -> Applied:
        from slimtorch.decompose import decompose_

        config = parse(request.options)
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


@_parses_options("fuse-tucker")
def _fuse_tucker_options(options: dict[str, Any]) -> bool:
    fold, rest = _pop_flag({"fold_bn": True, **options}, "fuse-tucker", "fold_bn")
    if rest:
        raise ValueError(f"fuse-tucker takes only the option 'fold_bn', got {sorted(rest)}")
    return fold


@COMPRESS_METHODS.register("fuse-tucker")
def _fuse_tucker(model: nn.Module, request: MethodRequest) -> Applied:
    """Tucker-2 layers as one fused kernel each (C on a CPU, CUDA on an NVIDIA GPU), with their
    batch norm, ReLU and residual.

    A deployment step for a model factorised with ``tucker``: resnet56 at rank 0.25 on its
    block convolutions ran 2.3x faster than the fastest dense form this way, on one CPU thread
    at batch 32 (1.4x as library convolutions) and on an H100 at batch 4096 (0.65x as library
    convolutions) (docs/benchmarks.md). With ``fold_bn`` (default
    on) the batch norms of the layers left dense are folded too.
    """
    from slimtorch.decompose import fuse_tucker_
    from slimtorch.quant import fold_bn_

    fold = _fuse_tucker_options(request.options)
    model.eval()
    report = fuse_tucker_(
        model, include=request.include, exclude=request.exclude, strict=request.strict
    )
    if not report.rows:  # nothing to fuse: refuse before folding anything
        among = " among the included layers" if request.include or request.exclude else ""
        raise ValueError(
            f"fuse-tucker found no Tucker-2 layer to fuse{among}; compress with --method "
            "tucker first (--method fold-bn folds batch norms on their own)"
        )
    info = report.to_dict()
    if fold:
        info["bn_folded"] = [r.bn for r in fold_bn_(model).folded]
    return Applied(
        config={"fold_bn": fold},
        report=info,
        table=report.to_table(),
        changed=bool(report.lowered) or bool(info.get("bn_folded")),
        trainable=False,
    )


def _compact_bytes(model: nn.Module) -> int:
    """Bytes of the model's compact file (zeros stored sparsely), headers included."""
    from slimtorch.prune import compact_file_bytes

    return compact_file_bytes({k: v.detach().cpu() for k, v in model.state_dict().items()})


def _compact_sizes(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's weights file and of its compact file, headers included."""
    from slimtorch.models.io import saved_bytes

    return {"dense_bytes": saved_bytes(model), "compact_bytes": _compact_bytes(model)}


def warn_folded(transforms: Sequence[Mapping[str, Any]]) -> None:
    """Warn before fine-tuning a model whose batch norms were folded away (fold-bn, the fused
    Tucker kernel): training without them is unstable (a fold-bn model lost 48 points in one
    Tucker fine-tuning epoch that cost 0.8 points unfolded on the digits)."""
    folded = [t["name"] for t in transforms if t.get("name") in FOLDING_TRANSFORMS]
    if folded:
        logging.getLogger(__name__).warning(
            "fine-tuning a model whose batch norms were folded away (%s): training without them "
            "is unstable; compress the unfolded model and fold (or fuse) last",
            ", ".join(dict.fromkeys(folded)),
        )


FOLDING_TRANSFORMS = ("quant.fold_bn", "decompose.fuse_tucker")


def file_bytes(model: nn.Module) -> int:
    """The size compress reports a model at: a pruned one's (with masks) compact file, as the
    run that pruned it reported it, so a chained run's "before" is that run's "after"; any
    other model's saved file. Headers included."""
    from slimtorch.models.io import saved_bytes
    from slimtorch.prune.buffers import masked_params

    return _compact_bytes(model) if masked_params(model) else saved_bytes(model)


SPARSE_CHECK = "sparse_check"
"""Option of the unstructured and N:M pruning methods (default on): time sparse kernels."""


def _sparse_kernels(model: nn.Module, request: MethodRequest) -> dict[str, Any]:
    """What :func:`~slimtorch.sparse.sparsify_` would do with a copy of the pruned model on the
    example batch, on this device: the layers a sparse kernel runs faster, and the whole model
    timed with and without them. A zero weight saves time only through such a kernel."""
    import copy

    from slimtorch.sparse import sparsify_
    from slimtorch.train.distributed import is_main_process

    x = request.example_input
    if not isinstance(x, torch.Tensor):
        return {"skipped": "no example batch to time on"}
    if not is_main_process():  # ranks would compete for the same device
        return {"skipped": "timed by the main process only"}
    report = sparsify_(copy.deepcopy(model).eval(), x, threads=request.threads).to_dict()
    layers = [
        {"name": r["name"], "choice": r["choice"], "speedup": r["speedup"]}
        for r in report["layers"]
        if r["action"] == "sparse"
    ]
    return {
        "device": report["device"],
        "batch": int(x.shape[0]),
        "sparse_layers": layers,
        # layers a sparse kernel ran on (not those left dense unmeasured: too few zeros)
        "timed_layers": sum(
            any(c["median_s"] is not None for c in r["candidates"]) for r in report["layers"]
        ),
        "model": report["model"],
        "notes": report["notes"],
    }


def _pruned_report(m: nn.Module, request: MethodRequest, check: bool) -> dict[str, Any]:
    """The pruning methods' finishing report: compact sizes and, with ``check``, sparse kernels."""
    out: dict[str, Any] = {"storage": _compact_sizes(m)}
    if check:
        out["sparse_kernels"] = _sparse_kernels(m, request)
    return out


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


def _pop_flag(
    options: dict[str, Any], method: str, key: str, default: bool = False
) -> tuple[bool, dict[str, Any]]:
    """Split a method-level boolean option (not a config field) off ``options``."""
    rest = dict(options)
    flag = rest.pop(key, default)
    if not isinstance(flag, bool):
        raise TypeError(f"{method} option {key!r} must be true or false, got {flag!r}")
    return flag, rest


def _config_from(
    config_type: type[ConfigT], options: dict[str, Any], method: str, *own: str
) -> ConfigT:
    """``config_type.from_dict(options)`` for a method that has already split off its own keys
    ``own`` (flags that are not config fields): an unknown key is named with every key the
    method takes, its own included, not just the config's fields."""
    fields = {f.name for f in dataclasses.fields(config_type) if f.init}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(
            f"unknown {method} option(s) {', '.join(unknown)}; "
            f"valid options: {', '.join(sorted(fields | set(own)))}"
        )
    return config_type.from_dict(options)


@_parses_options("prune")
def _prune_options(options: dict[str, Any]) -> tuple[bool, bool, Any]:
    from slimtorch.prune import MagnitudeConfig

    gradual, rest = _pop_flag(options, "prune", "gradual")
    check, rest = _pop_flag(rest, "prune", SPARSE_CHECK, default=True)
    return gradual, check, _config_from(MagnitudeConfig, rest, "prune", "gradual", SPARSE_CHECK)


@COMPRESS_METHODS.register("prune")
def _prune(model: nn.Module, request: MethodRequest) -> Applied:
    """Unstructured magnitude pruning, one-shot or gradual (``gradual=True``).

    One-shot prunes now and keeps the masks exact while fine-tuning (Han et al. 2015,
    arXiv:1506.02626); gradual adds all-true masks now and raises sparsity on the Zhu & Gupta
    2017 schedule (arXiv:1710.01878) over the first two thirds of the fine-tune.
    """
    from slimtorch.prune import GradualPruning, MaskCallback, prune_

    gradual, check, config = _prune_options(request.options)
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
        if gradual:  # the layer report is the pruned model's, not the all-true start's
            before = {r.name: r.zeros_before for r in report.rows}
            for row in final.rows:
                row.zeros_before = before.get(row.name, row.zeros_before)
            applied.report, applied.table = final.to_dict(), final.to_table()
        return {"final_layers": final.to_dict(), **_pruned_report(m, request, check)}

    applied = Applied(
        config={**config.to_dict(), "gradual": gradual, SPARSE_CHECK: check},
        report=report.to_dict(),
        table=report.to_table(),
        changed=bool(report.pruned),
        callbacks=callbacks,
        finish=finish,
        artifacts=_write_compact,
    )
    return applied


@_parses_options("nm")
def _nm_options(options: dict[str, Any]) -> tuple[bool, Any]:
    from slimtorch.prune import NMConfig

    check, rest = _pop_flag(options, "nm", SPARSE_CHECK, default=True)
    return check, _config_from(NMConfig, rest, "nm", SPARSE_CHECK)


@COMPRESS_METHODS.register("nm")
def _nm(model: nn.Module, request: MethodRequest) -> Applied:
    """N:M semi-structured magnitude pruning (2:4 by default), masks kept while fine-tuning."""
    from slimtorch.prune import MaskCallback, prune_

    check, config = _nm_options(request.options)
    report = prune_(
        model, config, include=request.include, exclude=request.exclude, strict=request.strict
    )
    return Applied(
        config={**config.to_dict(), SPARSE_CHECK: check},
        report=report.to_dict(),
        table=report.to_table(),
        changed=bool(report.pruned),
        callbacks=[MaskCallback()],
        finish=lambda m: _pruned_report(m, request, check),
        artifacts=_write_compact,
    )


@_parses_options("channel-prune")
def _channel_prune_options(options: dict[str, Any]) -> Any:
    from slimtorch.prune import ChannelPruneConfig

    return ChannelPruneConfig.from_dict(options)


@COMPRESS_METHODS.register("channel-prune")
def _channel_prune(model: nn.Module, request: MethodRequest) -> Applied:
    """Structured channel pruning through the dependency graph (dense, smaller layers).

    Taylor importance scores channels on training batches (Molchanov et al. 2019,
    arXiv:1906.10771); the other importances need no data.
    """
    from slimtorch.prune import prune_channels_

    config = _channel_prune_options(request.options)
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


# The quantization and deployment methods (ptq, qat, fp16, bf16, fold-bn, mixed) live in their
# own module; importing it registers them, so every user of COMPRESS_METHODS sees all methods.
from slimtorch.pipeline import quant_methods as _quant_methods  # noqa: E402, F401
