"""``to_qdq_``: swap named Conv2d/Linear layers for Q/DQ int8 modules, and its report.

The swap is recorded as the architecture transform ``"quant.qdq"`` (each layer's constructor
arguments, input parameters included), so a saved model reloads as the same int8 model
without calibration data. :class:`QDQAct` wraps a module (a ReLU after a residual add) so its
output is quantized too; wrapped modules are part of the same record.

Example:
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    >>> qp = LayerQParams(weight_scale=quantize_weight(net[0].weight)[1], input_scale=0.02)
    >>> to_qdq_(net, {"0": qp}).rows[0].action
    'quantized'
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from slimtorch.core.errors import ModelLoadError
from slimtorch.core.surgery import set_submodule
from slimtorch.core.table import text_table
from slimtorch.models.io import state_bytes
from slimtorch.models.transforms import ARCH_TRANSFORMS, record_transform
from slimtorch.quant.qdq import _INPUT_RANGES, _QD, LayerQParams, QDQConv2d, QDQLinear

logger = logging.getLogger(__name__)

TRANSFORM_NAME = "quant.qdq"
"""Architecture transform recorded by :func:`to_qdq_`."""


@dataclasses.dataclass
class ActQParams:
    """Per-tensor quantization of a module's output (``dtype`` "uint8" affine or "int8")."""

    scale: float
    zero_point: int = 0
    dtype: str = "uint8"

    def check(self, name: str) -> None:
        """Raise ``ValueError`` naming the module unless the parameters are valid."""
        if self.dtype not in _INPUT_RANGES:
            raise ValueError(f"ActQParams of {name!r}: dtype must be 'uint8' or 'int8'")
        qmin, qmax, _ = _INPUT_RANGES[self.dtype]
        if not isinstance(self.scale, int | float) or not 0 < self.scale < float("inf"):
            raise ValueError(f"ActQParams of {name!r}: scale must be finite and > 0")
        if not isinstance(self.zero_point, int) or not qmin <= self.zero_point <= qmax:
            raise ValueError(f"ActQParams of {name!r}: zero_point must be in [{qmin}, {qmax}]")


class QDQAct(nn.Module):
    """Run ``module``, then quantize and dequantize its output per tensor.

    Example:
        >>> act = QDQAct(nn.ReLU(), ActQParams(scale=0.1))
        >>> act(torch.tensor([0.26, -1.0]))
        tensor([0.3000, 0.0000])
    """

    def __init__(self, module: nn.Module, qp: ActQParams) -> None:
        super().__init__()
        self.module = module
        self.scale, self.zero_point, self.dtype = float(qp.scale), int(qp.zero_point), qp.dtype

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.module(*args, **kwargs)
        qmin, qmax, dtype = _INPUT_RANGES[self.dtype]
        q = _QD.quantize_per_tensor(y, self.scale, self.zero_point, qmin, qmax, dtype)
        return _QD.dequantize_per_tensor(q, self.scale, self.zero_point, qmin, qmax, dtype)

    def spec(self) -> dict[str, Any]:
        """JSON-ready parameters."""
        return {"scale": self.scale, "zero_point": self.zero_point, "dtype": self.dtype}

    def extra_repr(self) -> str:
        return f"{self.dtype}(scale={self.scale:.4g}, zp={self.zero_point})"


@dataclasses.dataclass
class QuantRow:
    """One targeted layer: quantized or skipped (with the reason), bits and bytes."""

    name: str
    module_type: str
    action: str
    reason: str | None = None
    mode: str | None = None
    weight_bits: int | None = None
    bytes_before: int = 0
    bytes_after: int = 0
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class QuantReport:
    """Rows for every targeted layer, the config used and the transform entries recorded."""

    method: str
    config: dict[str, Any]
    rows: list[QuantRow]
    entries: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def quantized(self) -> list[QuantRow]:
        """Rows with ``action == "quantized"``."""
        return [r for r in self.rows if r.action == "quantized"]

    @property
    def skipped(self) -> list[QuantRow]:
        """Rows with ``action == "skipped"``."""
        return [r for r in self.rows if r.action == "skipped"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: method, config, per-layer rows, totals, entries and extra info."""
        before = sum(r.bytes_before for r in self.rows)
        after = sum(r.bytes_after for r in self.rows)
        return {
            "method": self.method,
            "config": self.config,
            "layers": [dataclasses.asdict(r) for r in self.rows],
            "totals": {
                "bytes_before": before,
                "bytes_after": after,
                "ratio": before / after if after else None,
                "quantized": len(self.quantized),
                "skipped": len(self.skipped),
            },
            "entries": self.entries,
            "info": self.info,
        }

    def to_table(self) -> str:
        """A fixed-width text table, one line per layer."""
        lines: list[tuple[str, ...]] = [("layer", "action", "mode", "bits", "bytes", "reason")]
        for r in self.rows:
            lines.append(
                (
                    r.name,
                    r.action,
                    r.mode or "-",
                    "-" if r.weight_bits is None else str(r.weight_bits),
                    f"{r.bytes_before:,} -> {r.bytes_after:,}",
                    r.reason or "",
                )
            )
        return text_table(lines)


def _mode(qp: LayerQParams) -> str:
    if qp.input_dynamic:
        return "dynamic"
    return "weight_only" if qp.input_scale is None else "static"


def build_qdq(name: str, module: nn.Module, qp: LayerQParams) -> QDQConv2d | QDQLinear:
    """The Q/DQ replacement of the float ``module`` (validated; ``module`` is not changed).

    Raises:
        TypeError: ``module`` is not an ``nn.Conv2d``/``nn.Linear`` (or ``qp`` not LayerQParams).
        ValueError: ``qp`` does not fit the layer, or the conv uses string/non-zero padding.

    Example:
        >>> lin = nn.Linear(4, 2)
        >>> build_qdq("fc", lin, LayerQParams(weight_scale=torch.full((2,), 0.01))).out_features
        2
    """
    if not isinstance(qp, LayerQParams):
        raise TypeError(f"qparams[{name!r}] must be a LayerQParams, got {type(qp).__name__}")
    if isinstance(module, nn.Conv2d):
        qp.check(name, module.out_channels)
        return QDQConv2d.from_float(module, qp)
    if isinstance(module, nn.Linear):
        qp.check(name, module.out_features)
        return QDQLinear.from_float(module, qp)
    raise TypeError(
        f"{name!r} is a {type(module).__name__}; only nn.Conv2d and nn.Linear layers can be "
        "converted to Q/DQ int8 modules"
    )


def _mask_bytes(module: nn.Module) -> int:
    """Bytes of the pruning masks ``module`` holds: training aids its int8 form drops (the
    zeros stay in the weights), so not weight bytes the quantization saved."""
    return sum(
        b.numel()
        for n, b in module.named_buffers(recurse=False)
        if n.endswith("_mask") and b.dtype == torch.bool
    )


def to_qdq_(
    model: nn.Module,
    qparams: Mapping[str, LayerQParams],
    *,
    activations: Mapping[str, ActQParams] | None = None,
    method: str = "qdq",
    target: str = "portable",
) -> QuantReport:
    """Replace the named Conv2d/Linear layers of ``model`` by Q/DQ int8 modules, in place.

    Weights are quantized with the given per-channel scales (zero point 0). Everything is
    validated and built before the model is touched: on error, ``model`` is unchanged. When
    ``model`` carries ``slimtorch_arch`` (built by ``create_model``), the change is recorded as
    ``"quant.qdq"`` so ``save_model``/``load_model`` round-trip it.

    Args:
        model: The float model, changed in place.
        qparams: Dotted layer name -> :class:`~slimtorch.quant.qdq.LayerQParams`.
        activations: Dotted module name -> :class:`ActQParams`: those modules are wrapped in
            :class:`QDQAct` so their outputs are quantized (e.g. the ReLU after a residual add).
        method: Label stored in the report.
        target: Where the Q/DQ steps go: ``"portable"`` (as given), ``"inductor"`` or
            ``"onnxruntime"`` (see :func:`slimtorch.quant.placement.place_qdq_`; no calibration
            here, so outputs without parameters stay float). The placed model is recorded.
            ``compile_int8_x86`` and ``export_onnx`` place their own copies anyway.

    Returns:
        A :class:`QuantReport` with one ``"quantized"`` row per layer (``info["placement"]``
        lists what the target changed).

    Raises:
        TypeError: A named module is not Conv2d/Linear.
        ValueError: A name is not a submodule, its parameters do not fit the layer, or
            ``target`` is unknown.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 4))
        >>> scale = quantize_weight(net[0].weight)[1]
        >>> to_qdq_(net, {"0": LayerQParams(weight_scale=scale)}).rows[0].bytes_after
        64
    """
    from slimtorch.quant.placement import QDQ_TARGETS, place_unrecorded

    if target not in QDQ_TARGETS:
        raise ValueError(f"target must be one of {', '.join(QDQ_TARGETS)}, got {target!r}")
    modules = dict(model.named_modules())
    new: dict[str, QDQConv2d | QDQLinear] = {}
    rows: list[QuantRow] = []
    for name, qp in qparams.items():
        if not name or name not in modules:
            raise ValueError(
                f"{name!r} is not a submodule of {type(model).__name__}; names look like "
                f"{', '.join(n for n in list(modules)[1:7])}, ..."
            )
        old = modules[name]
        layer = build_qdq(name, old, qp).train(old.training)
        new[name] = layer
        rows.append(
            QuantRow(
                name,
                type(old).__name__,
                "quantized",
                mode=_mode(qp),
                weight_bits=qp.weight_bits,
                bytes_before=state_bytes(old) - _mask_bytes(old),
                bytes_after=state_bytes(layer),
                info={"input_scale": qp.input_scale, "input_zero_point": qp.input_zero_point}
                if qp.input_scale is not None
                else {},
            )
        )
    acts: dict[str, QDQAct] = {}
    for name, aq in (activations or {}).items():
        if not name or name not in modules or name in new:
            raise ValueError(
                f"activation {name!r} is not a submodule of {type(model).__name__} (or is also "
                "a quantized layer); name the module whose output is quantized"
            )
        if not isinstance(aq, ActQParams):
            raise TypeError(f"activations[{name!r}] must be ActQParams, got {type(aq).__name__}")
        aq.check(name)
        acts[name] = QDQAct(modules[name], aq)
    for name, layer in new.items():
        set_submodule(model, name, layer)
    for name, act in acts.items():
        set_submodule(model, name, act)
    placed = place_unrecorded(model, target)
    for name in placed.changes:
        m = model.get_submodule(name)
        if isinstance(m, QDQAct) and name not in acts:
            acts[name] = m
    report = QuantReport(method, {}, rows)
    report.info["activations"] = {n: a.spec() for n, a in acts.items()}
    if target != "portable":
        report.info["placement"] = {"target": target, "changes": placed.changes,
                                    "notes": placed.notes}  # fmt: skip
    if (new or acts) and isinstance(getattr(model, "slimtorch_arch", None), dict):
        params: dict[str, Any] = {"layers": {n: m.spec() for n, m in new.items()}}
        if acts:
            params["activations"] = {n: a.spec() for n, a in acts.items()}
        record_transform(model, TRANSFORM_NAME, params)
        report.entries.append({"name": TRANSFORM_NAME, "params": params})
    logger.info("to_qdq_: %d layer(s) converted to Q/DQ int8", len(new))
    return report


def _build_from_spec(spec: Mapping[str, Any], device: torch.device) -> QDQConv2d | QDQLinear:
    common = {
        k: spec[k]
        for k in ("weight_bits", "input_scale", "input_zero_point", "input_dtype", "input_dynamic")
    }
    for k in ("output_scale", "output_zero_point"):  # absent from records of older versions
        if k in spec:
            common[k] = spec[k]
    if spec["type"] == "conv2d":
        return QDQConv2d(
            spec["in_channels"], spec["out_channels"], tuple(spec["kernel_size"]),
            tuple(spec["stride"]), tuple(spec["padding"]), tuple(spec["dilation"]),
            spec["groups"], spec["bias"], device=device, **common,
        )  # fmt: skip
    if spec["type"] == "linear":
        return QDQLinear(
            spec["in_features"], spec["out_features"], spec["bias"], device=device, **common
        )
    raise ValueError(f"unknown Q/DQ layer type {spec['type']!r}; expected 'conv2d' or 'linear'")


def _device_of(module: nn.Module) -> torch.device:
    tensors = [*module.parameters(), *module.buffers()]
    return tensors[0].device if tensors else torch.device("cpu")


@ARCH_TRANSFORMS.register(TRANSFORM_NAME)
def replay_qdq(model: nn.Module, params: dict[str, Any]) -> None:
    """Rebuild the Q/DQ layers recorded by :func:`to_qdq_` (weights are loaded afterwards).

    Raises:
        ModelLoadError: The record is malformed or names a layer the model lacks.

    Example:
        >>> from slimtorch.models import create_model
        >>> model = create_model("lenet5")
        >>> scale = quantize_weight(model.fc1.weight)[1]
        >>> entry = to_qdq_(model, {"fc1": LayerQParams(weight_scale=scale)}).entries[-1]
        >>> fresh = create_model("lenet5")  # as load_model rebuilds it
        >>> replay_qdq(fresh, entry["params"])
        >>> type(fresh.fc1).__name__, fresh.load_state_dict(model.state_dict())
        ('QDQLinear', <All keys matched successfully>)
    """
    layers = params.get("layers") if isinstance(params, dict) else None
    if not isinstance(layers, dict):
        raise ModelLoadError(
            "quant.qdq record has no 'layers' mapping; expected {'layers': {name: spec}} as "
            "written by to_qdq_; re-save the model"
        )
    for name, spec in layers.items():
        try:
            old = model.get_submodule(name)
            layer = _build_from_spec(spec, _device_of(old))
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(
                f"cannot rebuild Q/DQ layer {name!r} from {spec!r} ({exc}); load it into the "
                "architecture it was saved from"
            ) from None
        set_submodule(model, name, layer)
    acts = params.get("activations", {})
    for name, spec in acts.items() if isinstance(acts, dict) else ():
        try:
            act = QDQAct(model.get_submodule(name), ActQParams(**spec))
        except (AttributeError, TypeError) as exc:
            raise ModelLoadError(
                f"cannot rebuild quantized activation {name!r} from {spec!r} ({exc}); load it "
                "into the architecture it was saved from"
            ) from None
        set_submodule(model, name, act)
