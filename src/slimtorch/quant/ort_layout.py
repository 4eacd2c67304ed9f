"""Channels-last int8 graphs for ONNX Runtime (step 3 of :mod:`slimtorch.quant.ort_graph`).

ORT fuses an exported Q/DQ graph into ``QLinearConv``/``QLinearAdd`` operators and, when it
loads the graph, moves convolutions to its channels-last (NHWC) variants with transposes where
layouts meet. That placement is greedy: with a float stem feeding the int8 region it left the
first stage's residual adds of resnet20 in NCHW behind six extra transposes, and it always
transposes the pooled vector back before the classifier. :func:`ort_channels_last` writes the
fused graph already channels-last, with one transpose where the int8 region starts, so ORT has
nothing left to place.

The pass knows ``QLinearConv``, ``QLinearGlobalAveragePool``, ``QLinearAdd``/``QLinearMul`` on
two maps, per-tensor ``QuantizeLinear``/``DequantizeLinear``, float elementwise operators whose
inputs are all maps in the same layout or scalars (``Add``, ``Clip``...), and the flatten of a
globally pooled map (N x 1 x 1 x C has the memory of N x C x 1 x 1). Any other operator that
would read a channels-last map (max-pooling, concatenation, resizing...) makes it refuse, and the
graph is left to ORT's own pass. The rewritten graph must give the original's outputs in ORT on
the example batch before it is used.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

_MS = "com.microsoft"
_TO_NHWC = [0, 2, 3, 1]
# float elementwise operators that keep a layout when every input is a map in it (or a scalar)
_ELEMENTWISE = frozenset(
    ("Add", "Sub", "Mul", "Div", "Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu")
)


class _Refused(Exception):
    """The graph holds something the channels-last pass does not handle (message says what)."""


def _fused_by_ort(proto: Any) -> Any:
    """The graph after ORT's layout-independent fusions (Q/DQ -> QLinear* operators)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.onnx"), os.path.join(tmp, "fused.onnx")
        onnx.save(proto, src)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = dst
        opts.log_severity_level = 3
        ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
        return onnx.load(dst)


def _scalar_param(node: Any, consts: dict[str, Any], index: int) -> bool:
    value = consts.get(node.input[index]) if len(node.input) > index else None
    return value is not None and value.size == 1


def _to_channels_last(proto: Any) -> list[str]:
    """Rewrite a fused QLinear graph to run channels-last, in place; returns what changed.

    Raises:
        _Refused: a 4-D channels-last tensor would reach an operator this pass does not know.
    """
    from onnx import helper, numpy_helper

    graph = proto.graph
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    nhwc: set[str] = set()  # tensors stored channels-last
    converted: dict[str, str] = {}  # NCHW tensor -> its channels-last copy
    out: list[Any] = []
    changes: list[str] = []

    def channels_last_input(node: Any, index: int) -> None:
        name = node.input[index]
        if name in nhwc:
            return
        if name not in converted:
            converted[name] = f"{name}_nhwc"
            out.append(helper.make_node("Transpose", [name], [converted[name]], perm=_TO_NHWC,
                                        name=f"{name}_to_nhwc"))  # fmt: skip
            changes.append(f"transpose {name} to NHWC")
        node.input[index] = converted[name]

    for node in graph.node:
        op, domain = node.op_type, node.domain
        inputs_nhwc = [i for i in node.input if i in nhwc]
        if op == "QLinearConv" and domain in ("", "ai.onnx"):
            node.domain = _MS
            node.attribute.append(helper.make_attribute("channels_last", 1))
            channels_last_input(node, 0)
            nhwc.add(node.output[0])
            changes.append(f"{node.name or node.output[0]}: QLinearConv channels-last")
        elif op == "QLinearGlobalAveragePool" and domain == _MS:
            for a in node.attribute:
                if a.name == "channels_last":
                    a.i = 1
            if not any(a.name == "channels_last" for a in node.attribute):
                node.attribute.append(helper.make_attribute("channels_last", 1))
            channels_last_input(node, 0)
            nhwc.add(node.output[0])
        elif op in ("QLinearAdd", "QLinearMul") and domain == _MS and inputs_nhwc:
            for index in (0, 3):
                if node.input[index] not in nhwc:
                    if consts.get(node.input[index]) is not None:
                        raise _Refused(f"{op} {node.name} broadcasts a constant")
                    channels_last_input(node, index)
            nhwc.add(node.output[0])
        elif op in ("QuantizeLinear", "DequantizeLinear") and inputs_nhwc:
            if not _scalar_param(node, consts, 1):
                raise _Refused(f"{op} {node.name} is per-channel on a channels-last tensor")
            nhwc.add(node.output[0])
        elif op in _ELEMENTWISE and domain in ("", "ai.onnx") and inputs_nhwc:
            for name in node.input:
                value = consts.get(name)
                if name and name not in nhwc and (value is None or value.size != 1):
                    raise _Refused(f"{op} {node.name} mixes a channels-last map with {name}")
            nhwc.add(node.output[0])
        elif op in ("Reshape", "Flatten") and inputs_nhwc:
            src = producer.get(node.input[0])
            shape = consts.get(node.input[1]) if op == "Reshape" else None
            flattens = (op == "Flatten" and all(a.i == 1 for a in node.attribute)) or (
                shape is not None and shape.size == 2
            )
            if not (src is not None and src.op_type == "QLinearGlobalAveragePool" and flattens):
                raise _Refused(f"{op} {node.name} reads a channels-last map")
            # N x 1 x 1 x C is laid out as N x C x 1 x 1: flattening either gives N x C
            changes.append(f"{node.name or node.output[0]}: flattens the pooled map directly")
        elif inputs_nhwc:
            raise _Refused(f"{op} {node.name} reads a channels-last tensor")
        out.append(node)
    outputs = {o.name for o in graph.output}
    if nhwc & outputs:
        raise _Refused("a graph output would be channels-last")
    del graph.node[:]
    graph.node.extend(out)
    del graph.value_info[:]  # shapes inferred for NCHW; ORT infers the new ones
    if not any(o.domain == _MS for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(_MS, 1))
    return changes


def cpu_session(proto: Any, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session on an in-memory graph (all optimisations; ``threads``: fixed
    intra-op threads, sequential execution).

    Example:
        >>> from onnx import helper, TensorProto
        >>> io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in "xy"]
        >>> graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", io[:1], io[1:])
        >>> opset = [helper.make_opsetid("", 18)]
        >>> sess = cpu_session(helper.make_model(graph, ir_version=9, opset_imports=opset), 1)
        >>> sess.run(None, {"x": np.array([-1.0, 2.0], np.float32)})[0].tolist()
        [0.0, 2.0]
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _same_outputs(a: Any, b: Any, example: torch.Tensor) -> float:
    """Max abs difference of two graphs' outputs in ORT on ``example`` (and a doubled batch)."""
    x = example.detach().cpu().float().numpy()
    batches = [x, np.concatenate([x, -x])]
    outs = []
    for proto in (a, b):
        sess = cpu_session(proto)
        name = sess.get_inputs()[0].name
        outs.append([sess.run(None, {name: xb})[0] for xb in batches])
    return max(float(np.abs(ya - yb).max()) for ya, yb in zip(*outs, strict=True))


def ort_channels_last(
    proto: Any, example: torch.Tensor, *, log_level: int = logging.INFO
) -> tuple[Any, list[str]]:
    """The exported Q/DQ graph with ORT's fusions applied and its int8 maps channels-last.

    Args:
        proto: The exported ONNX model (not changed).
        example: An input batch; the rewritten graph must give the original's outputs on it.
        log_level: The level of the log line that counts the changes (``logging.DEBUG`` for a
            graph that may not be kept).

    Returns:
        ``(graph, changes)``: the rewritten graph, or ``proto`` itself with one entry naming why
        it was left to ORT's own layout pass (onnxruntime missing, an operator this pass does
        not handle, outputs that differ).

    Example:
        >>> from onnx import helper, TensorProto
        >>> io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 4, 8, 8]) for n in "xy"]
        >>> relu = helper.make_node("Relu", ["x"], ["y"])
        >>> graph = helper.make_graph([relu], "g", io[:1], io[1:])
        >>> opset = [helper.make_opsetid("", 18)]
        >>> proto = helper.make_model(graph, ir_version=9, opset_imports=opset)  # ORT >= 1.16
        >>> graph, why = ort_channels_last(proto, torch.randn(1, 4, 8, 8))
        >>> graph is proto, why
        (True, ['left as Q/DQ: ORT formed no QLinearConv'])
    """
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return proto, ["left as Q/DQ: onnxruntime is not installed"]
    try:
        fused = _fused_by_ort(proto)
        if not any(n.op_type == "QLinearConv" for n in fused.graph.node):
            return proto, ["left as Q/DQ: ORT formed no QLinearConv"]
        changes = _to_channels_last(fused)
        diff = _same_outputs(proto, fused, example)
    except _Refused as exc:
        return proto, [f"left to ORT's layout pass: {exc}"]
    except Exception as exc:  # ORT's optimizer or session raised: keep the portable graph
        return proto, [f"left as Q/DQ: {type(exc).__name__}: {str(exc).splitlines()[0]}"]
    if diff > 1e-5:
        return proto, [f"left as Q/DQ: the channels-last graph differs by {diff:.3g}"]
    logger.log(log_level, "ONNX Runtime channels-last: %d changes", len(changes))
    return fused, changes
