"""Graph work for the ``onnxruntime`` export target: exact rewrites that ONNX Runtime runs faster.

:func:`~slimtorch.quant.export_onnx` with ``target="onnxruntime"`` applies three steps to an
int8 Q/DQ model, each measured on resnet20 (Fashion-MNIST, batch 1, one thread;
docs/benchmarks.md). Steps 2 and 3 are exact (same outputs up to ORT's own rounding); step 1
only skips quantizing the stem's input, so it is if anything closer to the float model:

1. :func:`float_narrow_convs` (on the module, before export): an int8 convolution with one to
   three input channels (a grey or RGB stem) runs in float. ORT's ``QLinearConv`` needs a
   multiple of four input channels for its fast symmetric kernel; a 1-channel stem took 20 us
   there, 13 us padded to four channels, plus the float pad, quantize and layout transpose in
   front of it (22 us in all), against 5 us for ORT's float NCHWc convolution. The stem's
   output is quantized as before, so every other layer stays int8. The stem's 144 weights
   stay float, which changes the model size by bytes.
2. :func:`ort_rewrites` (on the exported graph): ``ReduceMean`` over both spatial axes becomes
   ``GlobalAveragePool`` (ORT then forms ``QLinearGlobalAveragePool``) and the classifier's
   weights, which feed a float ``Gemm`` writing the graph output, are stored dequantized.
3. :func:`~slimtorch.quant.ort_layout.ort_channels_last` (on the exported graph): ORT's own
   fusion turns the Q/DQ pairs into ``QLinearConv``/``QLinearAdd`` operators, then every int8
   map is laid out channels-last with one transpose where the int8 region starts (ORT's load-time
   layout pass placed six extra transposes around a float stem's consumers). Graphs with
   operators the pass does not know are left to ORT.

Which stem is faster depends on the model, so :func:`ort_graph` builds both (int8 on channels
zero-padded to four by :func:`widen_narrow_convs`, or float) and keeps the one ORT runs faster
on the example batch: resnet20's 16-channel stem is faster float, vgg11-bn's 64-channel stem
with its max-pooling is faster int8 (batch 1: 2.31-2.40x over fp32 against 2.05x float).

Measured together: resnet20 int8 in ORT at batch 1 went from 0.2129 to 0.2063 ms
(fp32 0.4129 ms: 1.94x -> 2.00x) in a 40-round side-by-side probe.

Example:
    >>> import onnx
    >>> from onnx import helper, TensorProto
    >>> x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 2, 2])
    >>> y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 1, 1])
    >>> axes = helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])
    >>> node = helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="mean")
    >>> graph = helper.make_graph([node], "g", [x], [y], [axes])
    >>> proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    >>> ort_rewrites(proto)
    ['mean: ReduceMean -> GlobalAveragePool']
"""

from __future__ import annotations

import copy
import functools
import logging
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.core.errors import is_onnxruntime_error
from slimtorch.core.surgery import some_of
from slimtorch.quant.convert import QDQAct
from slimtorch.quant.ort_layout import cpu_session, ort_channels_last
from slimtorch.quant.qdq import QDQConv2d, QDQLinear

logger = logging.getLogger(__name__)

ORT_MIN_IN_CHANNELS = 4
"""Input channels below which an int8 convolution runs in float in the ORT export."""


class _ChannelPad(nn.Module):
    """Zero-pad the input's channels to ``conv.in_channels``, then run ``conv``."""

    def __init__(self, conv: nn.Module, channels: int) -> None:
        super().__init__()
        self.conv, self.channels = conv, channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 0, 0, 0, 0, self.channels - x.shape[1])))


def _narrow(m: nn.Module) -> bool:
    return (
        isinstance(m, QDQConv2d)
        and m.groups == 1
        and m.in_channels < ORT_MIN_IN_CHANNELS
        and m.input_scale is not None
        and not m.input_dynamic
    )


def widen_narrow_convs(model: nn.Module) -> list[str]:
    """Give static int8 convolutions with 1-3 input channels zero input channels up to
    :data:`ORT_MIN_IN_CHANNELS`, in place; returns their names.

    The outputs are unchanged (the added weights are zero and a zero input quantizes to the
    zero point). ORT's ``QLinearConv`` runs them faster: a 16-output convolution at 28x28 took
    20 us with 1 input channel and 13 us with 4.

    Example:
        >>> from slimtorch.models import create_model
        >>> from slimtorch.quant import PTQConfig, quantize_
        >>> net = create_model("resnet20", in_channels=1, input_size=28).eval()
        >>> calib = [(torch.randn(4, 1, 28, 28), torch.zeros(4, dtype=torch.long))]
        >>> _ = quantize_(net, PTQConfig(mode="static"), calibration=calib)
        >>> widen_narrow_convs(net), net.conv1.conv.in_channels
        (['conv1'], 4)
    """
    from slimtorch.core.surgery import set_submodule

    widened = []
    for name, m in list(model.named_modules()):
        if not _narrow(m):
            continue
        wide = copy.deepcopy(m)
        w = m.weight_int8
        pad = w.new_zeros(w.shape[0], ORT_MIN_IN_CHANNELS - w.shape[1], *w.shape[2:])
        wide.weight_int8 = torch.cat([w, pad], dim=1)
        wide.in_channels = ORT_MIN_IN_CHANNELS
        set_submodule(model, name, _ChannelPad(wide, ORT_MIN_IN_CHANNELS))
        widened.append(name)
    return widened


class _FloatConv(nn.Module):
    """A float convolution with the int8 layer's dequantized weights and output quantizer."""

    def __init__(self, layer: QDQConv2d) -> None:
        super().__init__()
        self.weight = nn.Parameter(layer.dequantized_weight().detach().clone())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        self.stride, self.padding = layer.stride, layer.padding
        self.dilation, self.groups = layer.dilation, layer.groups
        self.quantize_output = layer.quantize_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                     self.groups)  # fmt: skip
        return self.quantize_output(y)


def float_narrow_convs(model: nn.Module) -> list[str]:
    """Run static int8 convolutions with fewer than :data:`ORT_MIN_IN_CHANNELS` input channels
    in float, in place (the export's copy); returns their names.

    The float layer uses the dequantized int8 weights, so it computes what the Q/DQ layer
    computes without quantizing its input; an output quantizer the layer had is kept.

    Example:
        >>> from slimtorch.quant import PTQConfig, quantize_
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
        >>> _ = quantize_(net, PTQConfig(mode="static"), calibration=[torch.randn(4, 3, 9, 9)])
        >>> float_narrow_convs(net), type(net[0]).__name__, type(net[2]).__name__
        (['0'], '_FloatConv', 'QDQConv2d')
    """
    from slimtorch.core.surgery import set_submodule

    changed = []
    for name, m in list(model.named_modules()):
        if _narrow(m):
            set_submodule(model, name, _FloatConv(m))
            changed.append(name)
    return changed


def ort_rewrites(proto: Any, *, log_level: int = logging.INFO) -> list[str]:
    """Exact rewrites of an exported Q/DQ graph for ONNX Runtime, in place; returns what changed
    (and logs it at ``log_level``).

    - ``ReduceMean`` over the two spatial axes of a 4-D map (what ``AdaptiveAvgPool2d(1)``
      exports to) becomes ``GlobalAveragePool``, which ORT fuses with its Q/DQ into
      ``QLinearGlobalAveragePool``.
    - A ``DequantizeLinear`` of constant weights read only by ``Gemm`` nodes whose result is a
      graph output (the classifier: its logits leave the graph in float, so ORT runs a float
      ``Gemm``) is folded into a float initializer: ORT otherwise dequantizes them on every
      call. Hidden ``Gemm`` layers keep their int8 weights (ORT fuses those into ``QGemm``).

    resnet20 at batch 1, one thread: 0.215 -> 0.213 ms (both rewrites: 1.92x -> 1.99x over fp32
    in one side-by-side probe).
    """
    import numpy as np
    from onnx import helper, numpy_helper

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    consts = {
        n.output[0]: n.attribute[0].t
        for n in graph.node
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"
    }

    def const(name: str) -> Any:
        if name in inits:
            return numpy_helper.to_array(inits[name])
        return numpy_helper.to_array(consts[name]) if name in consts else None

    ranks = {
        v.name: len(v.type.tensor_type.shape.dim)
        for v in [*graph.value_info, *graph.input, *graph.output]
        if v.type.tensor_type.HasField("shape")
    }
    outputs = {o.name for o in graph.output}
    users: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    changes: list[str] = []
    folded: set[str] = set()
    keep = []
    for n in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "ReduceMean" and len(n.input) == 2 and ranks.get(n.input[0]) == 4:
            axes = const(n.input[1])
            if (
                axes is not None
                and sorted(int(a) % 4 for a in axes.reshape(-1)) == [2, 3]
                and attrs.get("keepdims", 1) == 1
            ):
                keep.append(helper.make_node("GlobalAveragePool", [n.input[0]], list(n.output),
                                             name=f"{n.name}_global"))  # fmt: skip
                changes.append(f"{n.name}: ReduceMean -> GlobalAveragePool")
                continue
        readers = users.get(n.output[0], []) if n.output else []
        if (
            n.op_type == "DequantizeLinear"
            and n.input[0] in inits
            and readers
            and all(
                r.op_type == "Gemm"
                and list(r.input).index(n.output[0]) == 1
                and r.output[0] in outputs
                for r in readers
            )
        ):
            q = const(n.input[0]).astype(np.float32)
            scale = const(n.input[1])
            zp = const(n.input[2]) if len(n.input) > 2 else None
            if scale is not None and (len(n.input) <= 2 or zp is not None):
                shape = [1] * q.ndim
                if np.ndim(scale):
                    shape[attrs.get("axis", 1)] = -1
                z = 0.0 if zp is None else np.reshape(zp.astype(np.float32), shape)
                w = ((q - z) * np.reshape(scale.astype(np.float32), shape)).astype(np.float32)
                graph.initializer.append(numpy_helper.from_array(w, n.output[0]))
                folded.add(n.input[0])
                changes.append(f"{n.name}: weights of {readers[0].name} stored dequantized")
                continue
        keep.append(n)
    del graph.node[:]
    graph.node.extend(keep)
    read = {i for n in keep for i in n.input}
    unused = [i for i in graph.initializer if i.name in folded and i.name not in read]
    for init in unused:  # the int8 copy of weights now stored dequantized
        graph.initializer.remove(init)
    logger.log(log_level, "ONNX Runtime rewrites: %s", changes)
    return changes


NARROW_CONV_MODES = ("measure", "int8", "float")
"""How the ORT export runs convolutions with 1-3 input channels: timed both ways, int8 on
channels zero-padded to four (:func:`widen_narrow_convs`), or float (:func:`float_narrow_convs`)."""


def check_narrow_convs(value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is one of :data:`NARROW_CONV_MODES`."""
    if value not in NARROW_CONV_MODES:
        raise ValueError(
            f"narrow_convs must be one of {', '.join(NARROW_CONV_MODES)}, got {value!r}"
        )


def time_graphs(
    graphs: dict[str, Any], example: torch.Tensor, *, rounds: int = 7, min_time_s: float = 0.02
) -> dict[str, list[float]]:
    """Seconds per call of each graph in ORT (one thread), measured in interleaved rounds.

    Each round runs every graph for at least ``min_time_s`` (and three calls) and records the
    median call; the result holds each graph's per-round medians, in round order, so ratios can
    be taken round by round.

    Example:
        >>> import pathlib, tempfile
        >>> import onnx
        >>> from slimtorch.quant.export import export_onnx
        >>> from slimtorch.models import create_model
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "lenet.onnx"
        >>> proto = onnx.load(export_onnx(create_model("lenet5"), path, torch.randn(1, 1, 28, 28)))
        >>> x = torch.randn(1, 1, 28, 28)
        >>> times = time_graphs({"a": proto, "b": proto}, x, rounds=2, min_time_s=0)
        >>> sorted(times), len(times["a"])
        (['a', 'b'], 2)
    """
    x = example.detach().cpu().float().numpy()
    runs: dict[str, Callable[[], Any]] = {}
    refused: list[str] = []
    for key, proto in graphs.items():
        try:
            sess = cpu_session(proto, threads=1)
            runs[key] = functools.partial(sess.run, None, {sess.get_inputs()[0].name: x})
            runs[key]()  # the first call allocates
        except Exception as exc:  # a graph ORT will not run (a scale out of its range)
            if not is_onnxruntime_error(exc):
                raise
            runs.pop(key, None)
            refused.append(f"{key}: {type(exc).__name__}: {str(exc).strip().splitlines()[-1]}")
            logger.warning("ONNX Runtime cannot run the %s graph (%s)", key, refused[-1])
    if not runs:
        raise ValueError(f"ONNX Runtime cannot run the exported graph ({'; '.join(refused)})")
    samples: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for key, fn in runs.items():
            times: list[float] = []
            end = time.perf_counter() + min_time_s
            while len(times) < 3 or time.perf_counter() < end:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            samples[key].append(statistics.median(times))
    return samples


def ort_graph(
    model: nn.Module,
    example: torch.Tensor,
    export: Callable[[nn.Module], Any],
    narrow_convs: str = "measure",
) -> Any:
    """The ONNX graph written for the ``onnxruntime`` target from a placed Q/DQ ``model``.

    Args:
        model: The placed Q/DQ model (not changed; each variant works on a copy).
        example: The example batch: the channels-last check runs on it and, with
            ``narrow_convs="measure"``, both stem variants are timed on it in ORT (one thread),
            so pass the batch size that will be served.
        export: Turns a module into an ONNX ``ModelProto``.
        narrow_convs: One of :data:`NARROW_CONV_MODES`. Which is faster depends on the model:
            resnet20's 16-channel float stem, quantized once, saves the quantize, pad and
            transpose in front of the int8 one; vgg11-bn's 64-channel stem with its pooling is
            faster int8 (batch 1: 2.31-2.40x over fp32 int8, 2.05x float).

    Returns:
        The ONNX ``ModelProto``.
    """
    check_narrow_convs(narrow_convs)
    modes = ["int8", "float"] if narrow_convs == "measure" else [narrow_convs]
    graphs: dict[str, Any] = {}
    notes: dict[str, list[tuple[str, Any]]] = {}  # each variant's log lines, for the one kept
    for mode in modes:
        work = copy.deepcopy(model)
        changed = (widen_narrow_convs if mode == "int8" else float_narrow_convs)(work)
        proto = export(work)
        # logged at debug level here; the variant kept is logged once below
        rewrites = ort_rewrites(proto, log_level=logging.DEBUG)
        graphs[mode], changes = ort_channels_last(proto, example, log_level=logging.DEBUG)
        notes[mode] = [("ONNX Runtime rewrites: %s", rewrites)]
        if graphs[mode] is proto:
            notes[mode].append((f"ONNX Runtime graph ({mode} stem): %s", changes[0]))
            logger.debug(*notes[mode][-1])
        else:
            notes[mode].append(("ONNX Runtime channels-last: %d changes", len(changes)))
        if not changed:
            break  # no narrow convolution: the variants are the same graph
    best = next(iter(graphs))
    if len(graphs) > 1:
        try:
            times = {k: statistics.median(v) for k, v in time_graphs(graphs, example).items()}
        except ImportError:
            times = {"int8": 0.0}
        best = min(times, key=lambda k: times[k])  # one time: the other one ORT would not run
        if len(times) > 1:
            logger.info(
                "ONNX Runtime narrow convolutions: %s (%s)",
                best, ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in times.items()),
            )  # fmt: skip
    for fmt, value in notes[best]:
        logger.info(fmt, value)
    return graphs[best]


def warn_signed_activations(model: nn.Module) -> None:
    """Warn that ONNX Runtime's x86 CPU provider runs symmetric (int8) activations in float.

    ORT there forms its int8 operators only from uint8 activations, and a ReLU in front of an
    int8 quantizer (zero point 0, not the type's minimum) stays a float op between the layer and
    its quantizer, so the layer cannot fuse either. resnet20 quantized with
    ``PTQConfig(symmetric=True)`` ran at 0.89 ms against 0.47 ms in fp32 (batch 1, one
    thread); storing its activations as uint8 with the zero point moved by 128 (exact) did
    not change that (0.93 ms), since the ReLUs stay.
    """
    signed = [
        name
        for name, m in model.named_modules()
        if (isinstance(m, QDQConv2d | QDQLinear) and m.input_scale is not None
            and m.input_dtype == "int8")
        or (isinstance(m, QDQAct) and m.dtype == "int8")
    ]  # fmt: skip
    if signed:
        warnings.warn(
            f"{some_of(signed)} quantizes its activations symmetric "
            "(int8): ONNX Runtime on x86 CPUs forms int8 operators only from uint8 "
            "activations and leaves these layers in float with extra quantize steps (resnet20 "
            "ran 1.9x slower than fp32); quantize with symmetric=False (affine uint8) for it",
            stacklevel=3,
        )
