"""Q/DQ placement per int8 runtime.

The two CPU runtimes want the quantize/dequantize steps in different places
around residual adds and global pooling: inductor fuses a convolution with the add that follows
it into one ``qconv2d_pointwise.binary`` kernel only when the convolution's output is *not*
quantized, while ONNX Runtime forms ``QLinearConv``/``QLinearAdd`` only when every int8
convolution's output and both add inputs *are*. :func:`place_qdq_` moves the steps for a target
(``compile_int8_x86`` and ``export_onnx`` place their own copies). At batch 1 these 28x28
models are bound by the fixed cost of each oneDNN call (tens of microseconds, fp32 and int8
alike), not by arithmetic, so int8 gains little there with convolutions; lowered to im2col +
linear (:func:`~slimtorch.quant.lower_conv_gemm_`) they run as inductor's own GEMM code instead.

Example:
    >>> from slimtorch.models import create_model
    >>> from slimtorch.quant.fold import fold_bn_
    >>> model = create_model("resnet20", in_channels=1, input_size=28).eval()
    >>> _ = fold_bn_(model)
    >>> batches = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(2)]
    >>> _ = quantize_(model, PTQConfig(mode="static"), calibration=batches)
    >>> placed = place_qdq_(model, "inductor")
    >>> placed.target, len(placed.changes) > 0
    ('inductor', True)
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import warnings
from typing import Any

import torch
from torch import nn

from slimtorch.core.surgery import kept_modes, set_submodule
from slimtorch.quant.convert import TRANSFORM_NAME, ActQParams, QDQAct
from slimtorch.quant.gemm import GemmConv2d
from slimtorch.quant.qdq import QDQConv2d, QDQLinear

logger = logging.getLogger(__name__)


QDQ_TARGETS = ("portable", "inductor", "onnxruntime")
"""Q/DQ placements: as calibrated, for inductor + oneDNN, or for ONNX Runtime."""

_PASS = (nn.Identity, nn.ReLU, nn.ReLU6, nn.MaxPool2d, nn.Flatten)  # keep int8 flowing to int8
_PASS_FUNCS = {torch.flatten, torch.relu, torch.nn.functional.relu, torch.reshape}
_PASS_METHODS = {"flatten", "view", "reshape", "relu", "contiguous"}
_ADDS = {operator.add, operator.iadd, torch.add}


class _LeafTracer(torch.fx.Tracer):
    """An fx tracer that keeps Q/DQ layers and wrapped activations as single nodes."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, QDQConv2d | QDQLinear | QDQAct):
            return True
        return super().is_leaf_module(m, module_qualified_name)


@dataclasses.dataclass
class Placement:
    """What :func:`place_qdq_` changed (dotted name -> change) and what it left (notes)."""

    target: str
    changes: dict[str, str] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)


def _mod(node: Any, modules: dict[str, nn.Module]) -> nn.Module | None:
    if isinstance(node, torch.fx.Node) and node.op == "call_module":
        return modules.get(str(node.target))
    return None


def _back(node: Any, modules: dict[str, nn.Module]) -> Any:
    while isinstance(_mod(node, modules), nn.Identity) and node.args:
        node = node.args[0]
    return node


def _only_feeds(src: torch.fx.Node, add: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``src``'s output reaches nothing but ``add`` (through Identity modules)."""
    node = src
    while len(node.users) == 1:
        node = next(iter(node.users))
        if node is add:
            return True
        if not isinstance(_mod(node, modules), nn.Identity):
            return False
    return False


def _static(m: nn.Module | None) -> bool:
    return isinstance(m, QDQConv2d | QDQLinear) and m.input_scale is not None


def _is_add(node: torch.fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADDS) or (
        node.op == "call_method" and node.target in ("add", "add_")
    )


def _reaches_float(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node``'s value reaches an op that does not take it quantized."""
    for user in node.users:
        m = _mod(user, modules)
        if _static(m) or isinstance(m, QDQAct):
            continue
        passes = (
            isinstance(m, _PASS)
            or (user.op == "call_function" and user.target in _PASS_FUNCS)
            or (user.op == "call_method" and user.target in _PASS_METHODS)
        )
        if not passes or _reaches_float(user, modules):
            return True
    return False


def _for_inductor(model: nn.Module, graph: torch.fx.Graph, out: Placement) -> None:
    modules = dict(model.named_modules())
    if any(isinstance(m, GemmConv2d) for m in modules.values()):
        # im2col + linear layers quantize their own input map once; a Q/DQ on an add's
        # output only adds a pass (resnet20 at batch 1, one thread: 0.62 -> 0.45 ms without)
        for name, m in modules.items():
            if isinstance(m, QDQAct):
                set_submodule(model, name, m.module)
                out.changes[name] = "activation Q/DQ dropped: GEMM layers quantize their input"
        modules = dict(model.named_modules())
    for node in graph.nodes:
        if not _is_add(node):
            continue
        srcs = [_mod(_back(a, modules), modules) for a in node.args[:2]]
        if any(isinstance(m, QDQConv2d) and m.output_scale is None for m in srcs):
            continue  # one input already comes straight from a conv: the fused one
        ins = [_back(a, modules) for a in node.args[:2]]
        if len(ins) == 2 and ins[0] is ins[1]:
            continue  # y + y: the fused kernel needs a second operand
        # a conv whose output the add alone reads: any other reader needs it quantized
        convs = [
            src
            for src in ins
            if isinstance(_mod(src, modules), QDQConv2d) and _only_feeds(src, node, modules)
        ]
        if convs:  # the other input stays int8: it is the fused kernel's second operand
            name = str(convs[0].target)
            layer = modules[name]
            assert isinstance(layer, QDQConv2d)
            layer.output_scale, layer.output_zero_point = None, 0
            out.changes[name] = "output Q/DQ dropped: conv + add (+ ReLU) fuse into one qconv"


def _observe(
    model: nn.Module, names: list[str], calibration: Any, observer: str, dtypes: dict[str, str]
) -> dict[str, tuple[float, int]]:
    from slimtorch.quant import _calib
    from slimtorch.quant.observers import make_observer

    batches = _calib.as_batches(calibration, max_batches=32)
    obs = {
        n: make_observer(
            observer, dtype=dtypes[n], symmetric=dtypes[n] == "int8", name=f"output of {n!r}"
        )
        for n in names
    }
    handles = [
        model.get_submodule(n).register_forward_hook(lambda _m, _a, y, o=o: o.update(y))
        for n, o in obs.items()
    ]
    device = _calib.model_device(model)
    try:
        with torch.no_grad(), kept_modes(model):
            for x, _ in batches:
                model(x.to(device))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n, o in obs.items():
        scale, zp = o.qparams()
        out[n] = (float(scale), int(zp))
    return out


def _for_onnxruntime(
    model: nn.Module, graph: torch.fx.Graph, out: Placement, calibration: Any, observer: str
) -> None:
    modules = dict(model.named_modules())
    points: dict[str, str] = {}  # module whose output gets quantized -> the conv it serves
    dtypes: dict[str, str] = {}
    for node in graph.nodes:
        layer = _mod(node, modules)
        if not isinstance(layer, QDQConv2d) or not _static(layer) or layer.output_scale is not None:
            continue
        if not _reaches_float(node, modules):
            continue
        point = str(node.target)
        users = list(node.users)
        while len(users) == 1 and isinstance(_mod(users[0], modules), nn.Identity):
            users = list(users[0].users)
        if len(users) == 1 and isinstance(_mod(users[0], modules), nn.ReLU | nn.ReLU6):
            point = str(users[0].target)
        points[point] = str(node.target)
        dtypes[point] = layer.input_dtype
    if not points:
        return
    if calibration is None:
        layers = ", ".join(sorted(points.values()))
        out.notes.append(
            f"{layers}: output stays float, so ONNX Runtime runs a float Conv and dequantizes "
            "its int8 weights on every run; pass calibration= to quantize the output"
        )
        warnings.warn(out.notes[-1], stacklevel=3)
        return
    qparams = _observe(model, list(points), calibration, observer, dtypes)
    for point, conv in points.items():
        scale, zp = qparams[point]
        m = modules[point]
        if isinstance(m, QDQConv2d):
            m.output_scale, m.output_zero_point = scale, zp
            out.changes[point] = "output quantized: ONNX Runtime runs QLinearConv"
        else:
            set_submodule(model, point, QDQAct(m, ActQParams(scale, zp, dtypes[point])))
            out.changes[point] = f"output quantized: ONNX Runtime runs {conv} as QLinearConv"


def _update_record(model: nn.Module, changes: dict[str, str]) -> None:
    arch = getattr(model, "slimtorch_arch", None)
    if not isinstance(arch, dict) or not changes:
        return
    entries = [e for e in arch.get("transforms", []) if e.get("name") == TRANSFORM_NAME]
    if not entries:
        return
    for name in changes:
        m = model.get_submodule(name)
        if isinstance(m, QDQConv2d | QDQLinear):
            for e in reversed(entries):
                if name in e["params"].get("layers", {}):
                    e["params"]["layers"][name] = m.spec()
                    break
        elif isinstance(m, QDQAct):
            entries[-1]["params"].setdefault("activations", {})[name] = m.spec()
        else:  # a dropped activation Q/DQ
            for e in entries:
                e["params"].get("activations", {}).pop(name, None)


def place_qdq_(
    model: nn.Module,
    target: str,
    *,
    calibration: Any = None,
    observer: str = "minmax",
) -> Placement:
    """Move the Q/DQ steps of a Q/DQ model to where ``target``'s int8 kernels want them.

    The layers' calibrated parameters stay; what changes is which tensors are quantized:

    - ``"inductor"``: the convolution feeding a residual add loses its output Q/DQ (the add's
      other input keeps its own), so inductor's x86 passes fuse conv + add (+ ReLU) into one
      oneDNN ``qconv2d_pointwise.binary`` kernel instead of a qconv, a dequantize and an
      elementwise kernel. (Quantizing before max-pools as well, exact since quantization
      commutes with max, took vgg11-bn from 5.9x to 6.3x at batch 32 but from 1.75x to 1.64x
      at batch 1, so it is not done.) In a model with :class:`~slimtorch.quant.gemm.GemmConv2d`
      layers (im2col + linear), the activation Q/DQ steps around residual adds are dropped
      instead: those layers quantize their own input map once, and the add stays float.
    - ``"onnxruntime"``: every int8 convolution gets a quantized output (after its ReLU when
      one follows), since ONNX Runtime only forms ``QLinearConv`` for DQ -> Conv -> Q and
      otherwise runs a float Conv that dequantizes its weights on every call. Outputs that
      have no calibrated parameters yet are observed on ``calibration``; residual adds keep
      Q/DQ on both inputs (``QLinearAdd``).
    - ``"portable"``: nothing changes.

    Keeping tensors in int8 from one integer kernel to the next, with ReLU and the residual
    add folded into the producing kernel, is the integer-only pipeline of Jacob et al., 2018,
    "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
    Inference" (arXiv:1712.05877); the placements follow the PyTorch 2 export X86 inductor
    quantizer's annotations (conv + add fusion) and ONNX Runtime's QDQ node-unit rules. When
    ``model`` carries a ``quant.qdq`` record, it is updated so ``save_model`` / ``load_model``
    reproduce the placed model. Running it twice changes nothing more.

    Args:
        model: A model converted by ``to_qdq_``/``quantize_`` (float layers are left alone).
        target: One of :data:`QDQ_TARGETS`.
        calibration: Inputs for the outputs ``"onnxruntime"`` needs (as ``quantize_`` takes
            them); without them those outputs stay float and a warning says which.
        observer: ``"minmax"``, ``"percentile"`` or ``"mse"``.

    Returns:
        A :class:`Placement` naming every changed module.

    Raises:
        ValueError: Unknown ``target``, or calibration data the model does not accept.

    Example:
        >>> from slimtorch.models import create_model
        >>> model = create_model("resnet20", in_channels=1, input_size=28).eval()
        >>> batches = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(2)]
        >>> _ = quantize_(model, PTQConfig(mode="static"), calibration=batches)
        >>> placement = place_qdq_(model, "inductor")
        >>> sorted(placement.changes)[:2], len(placement.changes)  # one conv per residual add
        (['layer1.0.conv2', 'layer1.1.conv2'], 9)
        >>> place_qdq_(model, "inductor").changes  # placed already: nothing more to do
        {}
    """
    out = place_unrecorded(model, target, calibration=calibration, observer=observer)
    _update_record(model, out.changes)
    return out


def place_unrecorded(
    model: nn.Module, target: str, *, calibration: Any = None, observer: str = "minmax"
) -> Placement:
    """:func:`place_qdq_` without touching the model's ``quant.qdq`` record (``to_qdq_``
    records the placed layers itself)."""
    if target not in QDQ_TARGETS:
        raise ValueError(f"target must be one of {', '.join(QDQ_TARGETS)}, got {target!r}")
    out = Placement(target)
    if target == "portable" or not any(
        isinstance(m, QDQConv2d | QDQLinear) for m in model.modules()
    ):
        return out
    try:
        graph = _LeafTracer().trace(model)
    except Exception as exc:  # fx raises many error types on untraceable code
        out.notes.append(f"not traced by torch.fx ({type(exc).__name__}); placement unchanged")
        logger.warning("place_qdq_: %s", out.notes[-1])
        return out
    if target == "inductor":
        _for_inductor(model, graph, out)
    else:
        _for_onnxruntime(model, graph, out, calibration, observer)
    logger.info("place_qdq_(%s): %d change(s)", target, len(out.changes))
    return out
