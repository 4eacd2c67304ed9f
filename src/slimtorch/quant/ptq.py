"""Post-training quantization: weight-only, dynamic and static int8 for Conv2d and Linear.

:func:`quantize_` turns the targeted layers into Q/DQ modules (:mod:`slimtorch.quant.qdq`):

- ``"weight_only"``: int8 (or 4-bit) per-channel weights, float activations; no data needed.
- ``"dynamic"``: int8 weights, activations quantized per batch at run time.
- ``"static"``: int8 weights and activation parameters fixed by calibration (min-max,
  percentile or MSE observers). BatchNorm is folded into the convolutions first
  (:func:`slimtorch.quant.fold.fold_bn_`), and, where the model has residual adds (found on
  its ``torch.fx`` graph), the add's inputs and the ReLU after it are quantized too, so the
  int8 runtimes keep the whole block in int8 (ONNX Runtime fuses ``QLinearConv`` and
  ``QLinearAdd``; inductor fuses the output quantization into oneDNN ``qconv``), as the
  PyTorch 2 export X86 quantizer does.

Calibration runs on a copy of the model: a failure (empty or wrong-shaped data, NaN/Inf
activations) raises and leaves the model untouched.

Example:
    >>> net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 26 * 26, 10))
    >>> report = quantize_(net, PTQConfig(mode="static"), calibration=[torch.randn(8, 1, 28, 28)])
    >>> [r.action for r in report.rows]
    ['quantized', 'quantized']
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import operator
from collections.abc import Callable, Iterable, Sequence
from glob import escape
from typing import Any

import torch
from torch import nn

from slimtorch.core.config import Config, check_bool, check_choice, check_range
from slimtorch.core.errors import TransformSkipError
from slimtorch.core.globs import check_globs as _check_globs
from slimtorch.core.globs import selected
from slimtorch.core.surgery import (
    fx_graph,
    refuse_sparse_kernels,
    replacement_blockers,
    require_float32,
    require_values,
)
from slimtorch.models.io import state_bytes
from slimtorch.quant import _calib
from slimtorch.quant.convert import ActQParams, QuantReport, QuantRow, build_qdq, to_qdq_
from slimtorch.quant.fold import fold_bn_, repeats_at_debug
from slimtorch.quant.lsq import LSQConv2d, LSQLinear
from slimtorch.quant.observers import CalibrationError, Observer, make_observer
from slimtorch.quant.qdq import LayerQParams, QDQConv2d, QDQLinear

logger = logging.getLogger(__name__)

_TARGETS = (nn.Conv2d, nn.Linear)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PTQConfig(Config):
    """Post-training quantization settings.

    Attributes:
        mode: ``"weight_only"``, ``"dynamic"`` or ``"static"``.
        observer: Activation range: ``"minmax"``, ``"percentile"`` or ``"mse"``.
        percentile: For the percentile observer, in ``(50, 100]``.
        per_channel: Per-output-channel weight scales (else one scale per layer).
        symmetric: Symmetric int8 activations (zero point 0) instead of affine uint8. For
            ONNX Runtime on x86 keep it off: ORT runs int8 activations in float there
            (``export_onnx`` warns).
        weight_bits: 8, or 4 (stored in int8, computed by dequantizing: no int4 kernel).
        weight_observer: Weight range: ``"minmax"`` or ``"mse"``.
        calibration_batches: Most batches used from the calibration data.
        skip_first: Keep the first targeted layer in float: the first one the first calibration
            batch runs in static mode (as casts and mixed precision count), the first in module
            order in the other modes, which have no data.
        skip_last: Keep the last targeted layer in float (counted the same way).
        fold_bn: Fold Conv2d -> BatchNorm2d pairs before quantizing (static and dynamic).
        quantize_residuals: Static mode: quantize residual adds' inputs and the ReLU after them.
    """

    mode: str = "static"
    observer: str = "minmax"
    percentile: float = 99.99
    per_channel: bool = True
    symmetric: bool = False
    weight_bits: int = 8
    weight_observer: str = "minmax"
    calibration_batches: int = 32
    skip_first: bool = False
    skip_last: bool = False
    fold_bn: bool = True
    quantize_residuals: bool = True

    def __post_init__(self) -> None:
        check_choice(self, "mode", self.mode, ("weight_only", "dynamic", "static"))
        check_choice(self, "observer", self.observer, ("minmax", "percentile", "mse"))
        check_range(self, "percentile", self.percentile, low=50.0, high=100.0, low_inclusive=False)
        check_choice(self, "weight_bits", self.weight_bits, (8, 4))
        check_choice(self, "weight_observer", self.weight_observer, ("minmax", "mse"))
        cb = self.calibration_batches
        if isinstance(cb, bool) or not isinstance(cb, int):
            raise ValueError(f"PTQConfig.calibration_batches must be an int >= 1, got {cb!r}")
        check_range(self, "calibration_batches", self.calibration_batches, low=1)
        for name in ("per_channel", "symmetric", "skip_first", "skip_last", "fold_bn",
                     "quantize_residuals"):  # fmt: skip
            check_bool(self, name, getattr(self, name))


# weight layers quantize_ has no int8 form for: reported as kept in float, never passed over
_NO_INT8 = (nn.modules.conv._ConvNd, nn.Embedding, nn.EmbeddingBag, nn.RNNBase, nn.RNNCellBase,
            nn.Bilinear, nn.MultiheadAttention)  # fmt: skip
_PARAM_HOLDERS = (nn.ParameterList, nn.ParameterDict)


def _not_targeted_reason(module: nn.Module) -> str | None:
    """Why a weight layer that is not a plain Conv2d/Linear stays float (``None``: not one)."""
    kind = type(module).__name__
    if isinstance(module, QDQConv2d | QDQLinear):
        return (
            f"already an int8 {kind}; left as it is (quantize the float model to change "
            "its settings)"
        )
    if isinstance(module, LSQConv2d | LSQLinear):
        return f"{kind} is a QAT layer; convert it with convert_qat_ to keep its learned steps"
    if isinstance(module, _TARGETS):  # a subclass: its owner may read .weight directly
        base = "nn.Conv2d" if isinstance(module, nn.Conv2d) else "nn.Linear"
        return (
            f"{kind} subclasses {base} with its own behaviour (nn.MultiheadAttention reads "
            "out_proj.weight directly); kept in float"
        )
    if isinstance(module, _NO_INT8):
        return f"no int8 kernel for {kind} here; kept in float"
    holders = [module, *module.children()]  # a holder's owner, a container's layers: reported
    if isinstance(module, _PARAM_HOLDERS) or any(
        not isinstance(c, _PARAM_HOLDERS) for c in holders[1:]
    ):
        return None
    if any(p.is_floating_point() and p.ndim >= 2 for h in holders for p in h.parameters(False)):
        return f"no int8 form of {kind} (it holds its own weight tensors); kept in float"
    return None


def _targets(
    model: nn.Module, include: Sequence[str] | None, exclude: Sequence[str] | None
) -> tuple[list[tuple[str, nn.Module]], list[QuantRow]]:
    """Plain Conv2d/Linear layers to quantize, and skip rows for other weight layers."""
    out: list[tuple[str, nn.Module]] = []
    rows: list[QuantRow] = []
    for name, module in model.named_modules():
        if not name or not selected(name, include, exclude):
            continue
        if type(module) in _TARGETS:
            out.append((name, module))
        elif (reason := _not_targeted_reason(module)) is not None:
            rows.append(QuantRow(name, type(module).__name__, "skipped", reason,
                                 bytes_before=state_bytes(module),
                                 bytes_after=state_bytes(module)))  # fmt: skip
    return out, rows


def _ends(
    work: nn.Module, targets: list[tuple[str, nn.Module]], batches: list[_calib.Batch]
) -> tuple[str | None, str | None]:
    """The first and last targeted layers: in the order the first batch runs them when there
    is data (a head registered before the body is then the last), else in module order."""
    order = [name for name, _ in targets]
    if batches:
        with _calib.track_calls(work, dict(targets)) as runs:
            _calib.run_batches(work, batches[:1])
        order = runs[0] if runs and runs[0] else order
    return (order[0], order[-1]) if order else (None, None)


def _skip_reason(
    name: str, module: nn.Module, ends: tuple[str | None, str | None], cfg: PTQConfig
) -> str | None:
    if cfg.skip_first and name == ends[0]:
        return "first layer kept in float (skip_first=True)"
    if cfg.skip_last and name == ends[1]:
        return "last layer kept in float (skip_last=True)"
    if isinstance(module, nn.Conv2d) and (
        isinstance(module.padding, str) or module.padding_mode != "zeros"
    ):
        return (
            f"padding={module.padding!r}/padding_mode={module.padding_mode!r}: the Q/DQ conv "
            "takes numeric zero padding only; kept in float"
        )
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if not isinstance(weight, torch.Tensor) or not bool(torch.isfinite(weight).all()):
        return "weights hold NaN/Inf; fix or re-initialise the layer first"
    if isinstance(bias, torch.Tensor) and not bool(torch.isfinite(bias).all()):
        return "bias holds NaN/Inf; fix or re-initialise the layer first"
    return None


def _weight_scale(module: nn.Module, cfg: PTQConfig, name: str) -> torch.Tensor:
    w = module.get_parameter("weight").detach()
    obs = make_observer(
        cfg.weight_observer,
        dtype="int8" if cfg.weight_bits == 8 else "int4",
        symmetric=True,
        per_channel=cfg.per_channel,
        ch_axis=0,
        name=f"{name}.weight",
    )
    obs.update(w)
    scale, _ = obs.qparams()
    return scale.reshape(-1).expand(w.shape[0]).clone().float()  # (C_out,)


_LAYOUT = ("view", "reshape", "permute", "contiguous", "flatten")
_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _follow(node: Any, modules: dict[str, nn.Module]) -> Any:
    """Skip ``nn.Identity`` modules (folded BatchNorms, identity shortcuts) and layout-only
    methods (the GEMM form's view and permute back to NCHW) backwards."""
    while isinstance(node, torch.fx.Node) and (
        (node.op == "call_module" and isinstance(modules.get(str(node.target)), nn.Identity))
        or (node.op == "call_method" and node.target in _LAYOUT)
    ):
        node = node.args[0] if node.args else None
    return node


def residual_points(
    model: nn.Module,
    layers: Iterable[str],
    may_wrap: Callable[[str], bool] = lambda name: True,
) -> tuple[set[str], set[str], str]:
    """Where static PTQ quantizes around residual adds, found on the ``torch.fx`` graph.

    An add is quantized only when every module it reads (and the ReLU after it) is a layer of
    ``layers`` or may be wrapped: not a conv/linear layer left out of
    ``layers`` (excluded, or skipped as first/last), and ``may_wrap(name)`` (not matched by an
    ``exclude`` glob); otherwise the add stays float and nothing around it changes.

    Returns:
        ``(layer_outputs, activations, note)``: names in ``layers`` whose output feeds an add
        (they get ``output_scale``), other modules whose output feeds an add or that read an
        add's only output (ReLU after the add; they get wrapped in ``QDQAct``), and a note
        (empty, or why the model could not be traced: then both sets are empty).

    Example:
        >>> from slimtorch.models import create_model
        >>> model = create_model("resnet20").eval()
        >>> _ = fold_bn_(model)  # as static PTQ does first: conv2 then feeds the add directly
        >>> outs, acts, note = residual_points(model, ["layer1.0.conv2"])
        >>> outs, "layer1.0.relu2" in acts, note
        ({'layer1.0.conv2'}, True, '')
    """
    try:
        graph = fx_graph(model)
    except Exception as exc:  # fx raises many error types on untraceable code
        return set(), set(), f"not traced by torch.fx ({type(exc).__name__}); adds stay float"
    modules = dict(model.named_modules())
    targets = set(layers)
    outs: set[str] = set()
    acts: set[str] = set()
    adds = {operator.add, operator.iadd, torch.add}
    for node in graph.nodes:
        is_add = (node.op == "call_function" and node.target in adds) or (
            node.op == "call_method" and node.target in ("add", "add_")
        )
        if not is_add:
            continue
        srcs = [_follow(arg, modules) for arg in node.args[:2]]
        names = [
            str(s.target) for s in srcs if isinstance(s, torch.fx.Node) and s.op == "call_module"
        ]
        users = list(node.users)
        relu = None
        if len(users) == 1 and users[0].op == "call_module":
            if isinstance(modules.get(str(users[0].target)), nn.ReLU | nn.ReLU6):
                relu = str(users[0].target)
        others = [n for n in [*names, *([relu] if relu else [])] if n not in targets]
        # a conv/linear here is a layer left out of ``layers`` (excluded, first/last); a
        # module wrapping a quantized one (the GEMM form) and a batch norm are not
        kept = [n for n in others if isinstance(modules[n], _LAYER_TYPES)]
        left_float = [*kept, *(n for n in others if not may_wrap(n))]
        if not names or left_float:
            continue  # only functions feed it, or a module around it must stay as it is
        outs.update(n for n in names if n in targets)
        acts.update(others)
    return outs, acts, ""


def _expected_shape(model: nn.Module) -> str:
    kwargs = getattr(model, "slimtorch_arch", {}).get("kwargs", {})
    if "in_channels" in kwargs and "input_size" in kwargs:
        size = kwargs["input_size"]
        return f"(N, {kwargs['in_channels']}, {size}, {size})"
    first = next((m for m in model.modules() if isinstance(m, _TARGETS)), None)
    if isinstance(first, nn.Conv2d):
        return f"(N, {first.in_channels}, H, W)"
    if isinstance(first, nn.Linear):
        return f"(N, ..., {first.in_features})"
    return "the model's input shape"


@torch.no_grad()
def _calibrate(
    work: nn.Module,
    layers: list[str],
    outputs: set[str],
    acts: set[str],
    batches: list[_calib.Batch],
    cfg: PTQConfig,
) -> tuple[dict[str, Observer], dict[str, Observer], dict[str, Observer]]:
    dtype = "int8" if cfg.symmetric else "uint8"

    def obs(name: str) -> Observer:
        return make_observer(cfg.observer, percentile=cfg.percentile, dtype=dtype,
                             symmetric=cfg.symmetric, name=name)  # fmt: skip

    ins = {n: obs(f"input of {n!r}") for n in layers}
    outs = {n: obs(f"output of {n!r}") for n in outputs}
    act = {n: obs(f"output of {n!r}") for n in acts}
    handles = []
    for name, module in work.named_modules():
        if name in ins:
            handles.append(module.register_forward_pre_hook(
                lambda _m, a, o=ins[name]: o.update(a[0])))  # fmt: skip
        if name in outs or name in act:
            o = outs.get(name) or act[name]
            handles.append(module.register_forward_hook(
                lambda _m, _a, y, o=o: o.update(y)))  # fmt: skip
    device = _calib.model_device(work)
    wdtype = next((p.dtype for p in work.parameters() if p.is_floating_point()), None)
    try:
        for i, (x, _) in enumerate(batches):
            if wdtype is not None and x.dtype != wdtype and x.is_floating_point():
                raise ValueError(
                    f"calibration batch {i} has dtype {x.dtype} but the model's weights are "
                    f"{wdtype}; give inputs of the model's dtype (x.to({wdtype}))"
                )
            try:
                work(x.to(device))
            except CalibrationError as exc:
                note = _calib.broken_tensors(work)
                raise CalibrationError(f"calibration batch {i}: {exc}{note}") from None
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                raise ValueError(
                    f"calibration batch {i} of shape {tuple(x.shape)} does not fit the model; "
                    f"expected {_expected_shape(work)} ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0]}). Give inputs of the shape the model "
                    f"takes{_calib.ONE_INPUT}"
                ) from None
    finally:
        for h in handles:
            h.remove()
    missing = [n for n, o in ins.items() if o.count == 0]
    if missing:
        raise CalibrationError(
            f"layer(s) {', '.join(missing)} never ran on the calibration data; exclude them "
            "or give inputs that reach them"
        )
    return ins, outs, act


def _scalar(qp: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, int]:
    return float(qp[0]), int(qp[1])


@repeats_at_debug()  # the scratch copy's fold and the model's: one summary line
def quantize_(
    model: nn.Module,
    config: PTQConfig,
    calibration: Any = None,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    strict: bool = False,
) -> QuantReport:
    """Quantize the Conv2d/Linear layers of ``model`` after training, in place.

    Args:
        model: The float model (eval-mode behaviour is what is quantized).
        config: A :class:`PTQConfig`.
        calibration: Static mode: a tensor, an ``(inputs, labels)`` pair or an iterable of
            either (a data loader); the first ``config.calibration_batches`` batches are used.
        include: Globs of dotted layer names to quantize (all Conv2d/Linear when ``None``).
        exclude: Globs of names to keep in float.
        strict: Raise :class:`~slimtorch.core.errors.TransformSkipError` naming every skipped
            layer instead of keeping them in float; the model is then unchanged.

    Returns:
        A :class:`~slimtorch.quant.convert.QuantReport` (``info`` holds the folded BatchNorms,
        the quantized activations and the calibration batch count).

    Raises:
        TypeError: ``config`` is not a PTQConfig, or bad globs.
        ValueError: Static mode without calibration data, empty data, or data of the wrong
            shape (the message names the expected shape).
        CalibrationError: NaN/Inf activations (the message names the layer).
        TransformSkipError: ``strict`` and a layer was skipped.

    Example:
        >>> from slimtorch.models import create_model
        >>> model = create_model("lenet5")
        >>> quantize_(model, PTQConfig(mode="weight_only")).to_dict()["totals"]["quantized"]
        5
    """
    require_values(model, "quantize_")
    refuse_sparse_kernels(model, "quantize_")
    check_bool("quantize_", "strict", strict)
    require_float32(model, "quantize_", "quantize the float32 model")
    if not isinstance(config, PTQConfig):
        raise TypeError(f"config must be a PTQConfig, got {type(config).__name__}")
    _check_globs(model, include, exclude, "quantize_")
    batches: list[_calib.Batch] = []
    if config.mode == "static":
        if calibration is None:
            raise ValueError(
                "static PTQ needs calibration data; pass calibration=<batches of real inputs> "
                "(a few hundred samples) or use mode='weight_only'/'dynamic'"
            )
        batches = _calib.as_batches(calibration, max_batches=config.calibration_batches)
    work = copy.deepcopy(model).eval()
    info: dict[str, Any] = {"folded_bn": [], "activations": {}, "calibration_batches": len(batches)}
    if config.fold_bn and config.mode != "weight_only":
        folded = fold_bn_(work)
        info["folded_bn"] = [[r.conv, r.bn] for r in folded.folded]
        if folded.reason:
            info["fold_note"] = folded.reason
    targets, rows = _targets(work, include, exclude)
    blocked = replacement_blockers(work, targets)
    ends = _ends(work, targets, batches) if config.skip_first or config.skip_last else (None, None)
    chosen: list[str] = []
    for name, module in targets:
        reason = blocked.get(name) or _skip_reason(name, module, ends, config)
        if reason is None:
            chosen.append(name)
        else:
            rows.append(QuantRow(name, type(module).__name__, "skipped", reason,
                                 bytes_before=state_bytes(module),
                                 bytes_after=state_bytes(module)))  # fmt: skip
    if strict and rows:
        listing = "; ".join(f"{r.name}: {r.reason}" for r in rows)
        raise TransformSkipError(
            f"quantize_ (strict) would skip {len(rows)} layer(s), model left unchanged: "
            f"{listing}. Exclude these layers or change the config"
        )
    qparams = {n: LayerQParams(weight_scale=_weight_scale(work.get_submodule(n), config, n),
                               weight_bits=config.weight_bits,
                               input_dtype="int8" if config.symmetric else "uint8",
                               input_dynamic=config.mode == "dynamic")
               for n in chosen}  # fmt: skip
    activations: dict[str, ActQParams] = {}
    if config.mode == "static":
        outs: set[str] = set()
        acts: set[str] = set()
        if config.quantize_residuals:
            # include picks layers; a ReLU or shortcut is kept float only when excluded
            outs, acts, note = residual_points(
                work, chosen, lambda name: selected(name, None, exclude)
            )
            if note:
                info["residual_note"] = note
        ins, out_obs, act_obs = _calibrate(work, chosen, outs, acts, batches, config)
        for n in chosen:
            s, z = _scalar(ins[n].qparams())
            qparams[n].input_scale, qparams[n].input_zero_point = s, z
            if n in out_obs:
                qparams[n].output_scale, qparams[n].output_zero_point = _scalar(
                    out_obs[n].qparams()
                )
        dtype = "int8" if config.symmetric else "uint8"
        activations = {n: ActQParams(*_scalar(o.qparams()), dtype) for n, o in act_obs.items()}
    try:  # build every Q/DQ layer once on the copy: a bad parameter fails here, not half-way
        for n, qp in qparams.items():
            build_qdq(n, work.get_submodule(n), qp)
        for n, aq in activations.items():
            aq.check(n)
    except ValueError as exc:
        raise CalibrationError(
            f"{exc}. The calibration inputs give no usable int8 range (values too large for "
            "float32 arithmetic?); check their scale. The model is unchanged"
        ) from None
    # everything is validated and calibrated: now change the real model
    if config.fold_bn and config.mode != "weight_only" and info["folded_bn"]:
        pairs = {c for c, _ in info["folded_bn"]}
        fold_bn_(model, include=[escape(n) for n in sorted(pairs)])  # exact names
    report = to_qdq_(model, qparams, activations=activations, method=f"ptq:{config.mode}")
    report.config = {"type": "PTQConfig", **config.to_dict()}
    order = [n for n, _ in work.named_modules()]
    report.rows = sorted(rows + report.rows, key=lambda r: order.index(r.name))
    info["activations"] = report.info.get("activations", {})
    report.info = info
    for r in report.quantized:
        if r.weight_bits == 4:
            r.info["kernel"] = "no int4 kernel: weights dequantized, float compute"
    logger.info("quantize_ (%s): %d quantized, %d skipped", config.mode,
                len(report.quantized), len(report.skipped))  # fmt: skip
    return report
