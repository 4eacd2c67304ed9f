"""ONNX export (dynamo exporter) of fp32, fp16 and int8 Q/DQ models, and ONNX Runtime checks.

:func:`export_onnx` traces the model with ``torch.onnx.export(..., dynamo=True)``. In a Q/DQ
model (:mod:`slimtorch.quant.qdq`) the ``quantized_decomposed`` operators become ONNX
``QuantizeLinear``/``DequantizeLinear`` (int8 weights stay int8 initializers with per-channel
scales, ``axis=0``), the standard QDQ format that ONNX Runtime's CPU provider fuses into
``QLinearConv``, ``QLinearMatMul`` and ``QLinearAdd`` int8 kernels (:func:`ort_int8_ops` lists
what it fused). Writes are atomic.

Tolerances (ONNX Runtime vs PyTorch eager, same inputs, as checked by the tests):

- fp32: max abs difference <= 1e-4 (plus 1e-5 x the output magnitude).
- fp16 (model and inputs cast to half): <= 1e-2 x the output magnitude.
- int8 Q/DQ: ORT computes in integers and requantizes with its own rounding, so single
  activations can land one quantization step apart; the outputs differ by a few output steps
  (<= 5% of the output magnitude on the test models) and top-1 agrees on >= 98% of inputs.

Example:
    >>> import pathlib, tempfile
    >>> from slimtorch.models import create_model
    >>> qdq_model = create_model("lenet5", in_channels=1, input_size=28).eval()
    >>> calib = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(2)]
    >>> _ = quantize_(qdq_model, PTQConfig(mode="static"), calibration=calib)
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> path = export_onnx(qdq_model, d / "model.int8.onnx", torch.randn(1, 1, 28, 28))
    >>> x = torch.randn(8, 1, 28, 28)
    >>> err = compare_onnx(qdq_model, path, x)  # int8 in ORT vs PyTorch: a few output steps
    >>> err <= 0.05 * qdq_model(x).detach().abs().max().item()
    True
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtorch.core.devices import kept_rng
from slimtorch.core.errors import first_line, require_modules
from slimtorch.core.io import atomic_write
from slimtorch.core.surgery import refuse_sparse_kernels, some_of
from slimtorch.quant.convert import QDQAct
from slimtorch.quant.ort_graph import check_narrow_convs, ort_graph, warn_signed_activations
from slimtorch.quant.ort_run import ort_session, run_onnx
from slimtorch.quant.precision import beyond_range, check_export_dtypes, layer_precisions
from slimtorch.quant.qdq import QDQConv2d, QDQLinear

logger = logging.getLogger(__name__)

_INT8_OPS = ("QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
             "QLinearAveragePool", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat",
             "DynamicQuantizeMatMul", "QGemm")  # fmt: skip


def is_qdq_model(model: nn.Module) -> bool:
    """Whether ``model`` holds Q/DQ int8 layers.

    Example:
        >>> is_qdq_model(nn.Linear(2, 2))
        False
    """
    return any(isinstance(m, QDQConv2d | QDQLinear | QDQAct) for m in model.modules())


def qdq_activation_kinds(model: nn.Module) -> dict[str, int]:
    """How the int8 layers of ``model`` take their inputs: layer counts by ``"static"``
    (calibrated int8), ``"dynamic"`` (int8 per batch) and ``"float"`` (weight-only int8).

    Example:
        >>> qdq_activation_kinds(nn.Linear(2, 2))
        {}
    """
    kinds: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QDQConv2d | QDQLinear):
            kind = ("dynamic" if m.input_dynamic else "float" if m.input_scale is None
                    else "static")  # fmt: skip
            kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_input: torch.Tensor,
    *,
    dtype: str = "fp32",
    dynamic_batch: bool = True,
    opset: int | None = None,
    target: str = "onnxruntime",
    calibration: Any = None,
    narrow_convs: str = "measure",
) -> Path:
    """Export ``model`` to an ONNX file with the dynamo exporter (atomic write).

    Args:
        model: A float or Q/DQ model (copied, put in eval mode, moved to the CPU).
        path: The ``.onnx`` file to write (weights embedded, no external data file).
        example_input: One input batch (its batch size does not matter with
            ``dynamic_batch``); float, or integer for token ids (kept as they are).
        dtype: ``"fp32"``, or ``"fp16"`` (float models only: weights and input in half).
        dynamic_batch: Make the batch dimension dynamic (name ``"batch"``).
        opset: ONNX opset (``None``: the exporter's default, >= 18).
        target: Q/DQ placement applied to the exported copy of a Q/DQ model
            (:func:`slimtorch.quant.placement.place_qdq_`): ``"onnxruntime"`` quantizes every
            int8 convolution's output so ONNX Runtime forms ``QLinearConv`` throughout, and
            writes the graph with ORT's int8 operators fused and channels-last where it can
            (:mod:`slimtorch.quant.ort_graph`: ORT-specific operators of its CPU provider,
            measured faster there; for ORT's GPU providers export ``"portable"``, whose Q/DQ
            graph they run as they are);
            ``"portable"`` exports the standard Q/DQ graph of the model as it is.
        calibration: Inputs to calibrate the outputs the placement adds (e.g. the last
            convolution before global pooling); without them those stay float (a warning
            names them). ``model`` itself is never changed.
        narrow_convs: For the ``onnxruntime`` target, how convolutions with 1-3 input
            channels run (:data:`~slimtorch.quant.ort_graph.NARROW_CONV_MODES`): ``"measure"``
            times int8 (channels zero-padded to four) against float on ``example_input`` in ORT
            and writes the faster graph; ``"int8"`` or ``"float"`` choose without timing.

    Returns:
        The written path.

    Raises:
        ValueError: Unknown ``dtype`` or ``target``, fp16 asked for a Q/DQ model or for a
            model already cast, bfloat16 layers, a model with
            :class:`~slimtorch.quant.gemm.GemmConv2d` layers, or the export failed (the
            message carries the exporter's reason).
        ImportError: onnx or onnxscript is not installed (the message names the extra).

    Example:
        >>> import pathlib, tempfile
        >>> from slimtorch.models import create_model
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> path = export_onnx(create_model("lenet5"), d / "lenet.onnx", torch.randn(1, 1, 28, 28))
        >>> path == d / "lenet.onnx", path.is_file()
        (True, True)
    """
    if dtype not in ("fp32", "fp16"):
        raise ValueError(f"dtype must be 'fp32' or 'fp16', got {dtype!r}")
    require_modules("onnx", "onnxscript", purpose="ONNX export")
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a tensor, got {type(example_input).__name__}")
    check_export_dtypes(model, example_input)
    refuse_sparse_kernels(model, "export_onnx")
    if dtype == "fp16" and layer_precisions(model):  # half() would also cast its fp32 layers
        raise ValueError(
            f"the model is already cast ({export_precision(model)}); export it with "
            "dtype='fp32' (--dtype fp32), which writes its layers in the precision they have"
        )
    if any(isinstance(m, QDQConv2d | QDQLinear) and m.input_dynamic for m in model.modules()):
        raise ValueError(
            "dynamic-quantization layers compute their scale per batch and have no ONNX Q/DQ "
            "form here; export the float model and run onnxruntime.quantization."
            "quantize_dynamic on it, or use PTQConfig(mode='static')"
        )
    from slimtorch.decompose.fused import FusedTuckerConv2d
    from slimtorch.quant.gemm import GemmConv2d

    for layer_kind, why in (
        (
            GemmConv2d,
            "convolutions lowered to im2col + linear are for inductor (ONNX has no strided "
            "view); export the model from before lower_conv_gemm_ (ONNX Runtime runs its "
            "convolutions as QLinearConv)",
        ),
        (
            FusedTuckerConv2d,
            "its one-kernel layer (slimtorch::tucker_block) has no ONNX form; export the model "
            "from before fuse-tucker, whose Tucker factors export as three convolutions, or "
            "export this one with torch.export (slimtorch export --format pt2)",
        ),
    ):
        found = [n for n, m in model.named_modules() if isinstance(m, layer_kind)]
        if found:
            raise ValueError(f"{some_of(found)} is a {layer_kind.__name__}: {why}")
    from slimtorch.quant.placement import QDQ_TARGETS, place_qdq_

    if target not in QDQ_TARGETS:
        raise ValueError(f"target must be one of {', '.join(QDQ_TARGETS)}, got {target!r}")
    check_narrow_convs(narrow_convs)
    work = _cpu_copy(model)
    x = _float32(example_input)
    if is_qdq_model(work):
        place_qdq_(work, target, calibration=calibration)
    if dtype == "fp16":
        if is_qdq_model(work):
            raise ValueError(
                "fp16 export of an int8 Q/DQ model is not supported (its scales and quantize "
                "steps are float32); export it with dtype='fp32' (it still runs int8)"
            )
        if big := beyond_range(work, torch.float16):
            raise ValueError(f"fp16 export: {big}, which the cast would make Inf; export fp32, "
                             "or cast_ the model (it keeps such layers in float32)")  # fmt: skip
        work, x = work.half(), (x.half() if x.is_floating_point() else x)
    if dynamic_batch and x.shape[0] > MAX_DYNAMIC_BATCH:
        raise ValueError(
            f"example_input has batch {x.shape[0]}; with a dynamic batch the example must have "
            f"at most {MAX_DYNAMIC_BATCH} rows (the exported graph takes any batch up to that)"
        )
    dynamic_shapes = (
        ({0: torch.export.Dim("batch", min=1, max=MAX_DYNAMIC_BATCH)},) if dynamic_batch else None
    )

    def to_onnx(module: nn.Module) -> Any:
        with _quiet_exporter(), kept_rng():  # the exporter's own sample inputs draw from it
            try:
                program = torch.onnx.export(
                    module, (x,), dynamo=True, dynamic_shapes=dynamic_shapes,
                    opset_version=opset, input_names=["input"], output_names=["output"],
                    external_data=False,
                )  # fmt: skip
            except ImportError:  # onnxscript's own imports: a missing package, not the model
                raise
            except Exception as exc:  # the exporter raises many error types
                root: BaseException = exc
                while root.__cause__ is not None:  # torch.export's own reason, not "step 1/3"
                    root = root.__cause__
                raise ValueError(
                    f"ONNX export of {type(model).__name__} failed ({type(root).__name__}: "
                    f"{first_line(root)}); check that the model runs on example_input and "
                    "uses exportable operations (no Python control flow on tensor values)"
                ) from exc
        assert program is not None
        return program

    if target == "onnxruntime":
        warn_signed_activations(work)
    (out := Path(path)).parent.mkdir(parents=True, exist_ok=True)
    if target == "onnxruntime" and is_qdq_model(work):
        import onnx

        proto = ort_graph(work, x, lambda m: to_onnx(m).model_proto, narrow_convs)
        atomic_write(out, lambda p: onnx.save(proto, p))
    else:
        program = to_onnx(work)
        atomic_write(out, lambda p: program.save(p, external_data=False))
    logger.debug("exported %s (%s) to %s", type(model).__name__, export_precision(work, dtype), out)
    return out


MAX_DYNAMIC_BATCH = 65536
"""Largest batch an exported graph with a dynamic batch dimension is traced for."""


def export_precision(model: nn.Module, dtype: str = "fp32") -> str:
    """What :func:`export_onnx` writes for ``model`` with ``dtype``, in words.

    Example:
        >>> from slimtorch.quant.precision import set_precision_
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> export_precision(net), export_precision(net, "fp16")
        ('fp32', 'fp16')
        >>> _ = set_precision_(net, ["0"], torch.float16)  # what compress --method fp16 does
        >>> export_precision(net)
        'fp32 input, float16 in 1 of 2 layers'
    """
    if is_qdq_model(model):
        kinds = qdq_activation_kinds(model)
        if set(kinds) <= {"static"}:
            return "int8 Q/DQ"
        if set(kinds) == {"float"}:
            return "int8 weights (Q/DQ), float activations"
        counts = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
        return f"int8 weights (Q/DQ); activations of the layers: {counts}"
    if dtype == "fp16":
        return "fp16"
    layers = layer_precisions(model)
    low = sorted({v for v in layers.values() if v != "float32"})
    if not low:
        return "fp32"
    count = sum(v != "float32" for v in layers.values())
    return f"fp32 input, {'/'.join(low)} in {count} of {len(layers)} layers"


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Keep the exporter's prints, warnings and log lines out of the user's console."""
    names = ("torch.onnx._internal.exporter._registration", "torch.fx.experimental.symbolic_shapes")
    loggers = {lg: lg.level for lg in map(logging.getLogger, names)}  # the latter dumps graphs
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            open(os.devnull, "w") as sink,
            contextlib.redirect_stdout(sink),
            contextlib.redirect_stderr(sink),  # graph dumps of a failed torch.export
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in loggers.items():
            lg.setLevel(level)


def _cpu_copy(model: nn.Module) -> nn.Module:  # NCHW: the exporter fails on channels-last
    return copy.deepcopy(model).cpu().eval().to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]


def compare_onnx(
    model: nn.Module, path: str | os.PathLike[str], inputs: torch.Tensor, *, threads: int = 1
) -> float:
    """Max absolute difference between ONNX Runtime's and PyTorch's outputs on ``inputs``.

    PyTorch runs the model in eval mode, in the ONNX file's input dtype. See the module
    docstring for the tolerances to expect; :func:`check_onnx` (whose ``max_abs_diff`` this is)
    has the example and also reports top-1 agreement.
    """
    return check_onnx(model, path, inputs, threads=threads)["max_abs_diff"]


def check_onnx(
    model: nn.Module, path: str | os.PathLike[str], inputs: torch.Tensor, *, threads: int = 1
) -> dict[str, float]:
    """ONNX Runtime's outputs against PyTorch's on ``inputs``: ``max_abs_diff`` and, for
    outputs of shape ``(N, classes)``, ``top1_agreement`` (share of equal arg-max).

    Int8 graphs should be checked on real inputs: random ones leave the calibrated activation
    ranges, where both sides clamp and any difference in where ONNX Runtime requantizes (a
    residual add it runs in int8, say) grows as large as the logits. resnet20 int8 on 512
    Fashion-MNIST test images: max difference 0.38 (logits up to 16), 99.6% equal top-1; on
    random normal inputs: 7.5 and 41%.

    Example:
        >>> import pathlib, tempfile
        >>> from slimtorch.models import create_model
        >>> model = create_model("lenet5", in_channels=1, input_size=28).eval()
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "model.onnx"
        >>> _ = export_onnx(model, path, torch.randn(1, 1, 28, 28))
        >>> check = check_onnx(model, path, torch.randn(8, 1, 28, 28))
        >>> check["max_abs_diff"] < 1e-4, check["top1_agreement"]
        (True, 1.0)
    """
    session = ort_session(path, threads)
    got = run_onnx(session, inputs)
    work = _cpu_copy(model)
    x = _float32(inputs)
    if session.get_inputs()[0].type == "tensor(float16)":
        work, x = work.half(), (x.half() if x.is_floating_point() else x)
    with torch.no_grad():
        ref = work(x).float()
    return output_agreement(got, ref)


def _float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` on the CPU, float32 unless it holds integers (token ids stay as they are)."""
    x = x.detach().cpu()
    return x.float() if x.is_floating_point() else x


def output_agreement(got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """``max_abs_diff`` of two models' outputs and, for ``(N, classes)`` outputs,
    ``top1_agreement`` (share of rows with the same arg-max).

    Example:
        >>> got = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> ref = torch.tensor([[0.9, 0.0], [1.0, 0.0]])
        >>> output_agreement(got, ref)
        {'max_abs_diff': 1.0, 'top1_agreement': 0.5}
    """
    got, ref = got.detach().float(), ref.detach().float()
    out = {"max_abs_diff": float((got - ref).abs().max())}
    if ref.ndim == 2 and ref.shape[1] > 1:
        out["top1_agreement"] = float((got.argmax(1) == ref.argmax(1)).float().mean())
    return out


def ort_int8_ops(path: str | os.PathLike[str]) -> dict[str, int]:
    """Int8 kernels ONNX Runtime runs for a model after its graph optimisations.

    Returns:
        Op type -> count in the optimised graph (``QLinearConv``, ``QLinearMatMul``,
        ``QLinearAdd`` ...); empty when every node runs in float.

    Example:
        >>> import pathlib, tempfile
        >>> from slimtorch.models import create_model
        >>> model = create_model("lenet5", in_channels=1, input_size=28).eval()
        >>> calib = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(2)]
        >>> _ = quantize_(model, PTQConfig(mode="static"), calibration=calib)
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "model.int8.onnx"
        >>> x = torch.randn(1, 1, 28, 28)
        >>> ort_int8_ops(export_onnx(model, path, x, narrow_convs="int8"))
        {'QGemm': 2, 'QLinearConv': 2}
    """
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        opt = os.path.join(tmp, "optimized.onnx")
        ort_session(path, 1, optimized_path=opt)
        graph = onnx.load(opt).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        if node.op_type in _INT8_OPS:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))
