"""The inputs and outputs of an ONNX file, read from the file without loading the model.

A repository scan reads only small files, so this module walks the protobuf wire format of the
``.onnx`` file over a memory map: the graph's ``input`` and ``output`` entries (name, element
type, shape) and the initializer names (older files list initializers as inputs too). Weights
are skipped, never read, and neither ``onnx`` nor ONNX Runtime is imported.

What it is used for:

* :func:`derive_onnx_config`: the serving config's ``inputs`` and ``outputs`` of a model folder
  whose ``config.json`` leaves them out (or that has none). Every tensor needs a dynamic first
  dimension, which becomes the batch (``slimtorch export`` writes one, named ``batch``); the
  other dimensions become ``dims`` (``-1`` where dynamic).
* :func:`check_onnx_config`: a config's tensor names, input datatypes and input dims against the
  graph, so a mismatch marks the model not ready at the scan rather than at its first request.
* :func:`external_data_files`: the files the graph's external data names (counted against the
  memory budget), refusing locations outside the model file's folder.
* :func:`config_from_signature` and :func:`check_input_tensors` are the format-free halves of
  those two, shared with :mod:`slimtorch.serve.pt2_graph` (torch.export programs).

Example (a graph ``y = x @ W`` with a dynamic batch ``N``):
    >>> import tempfile
    >>> import numpy as np
    >>> import onnx
    >>> from onnx import TensorProto, helper, numpy_helper
    >>> graph = helper.make_graph(
    ...     [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
    ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
    ...     [numpy_helper.from_array(np.ones((4, 3), np.float32), "W")])
    >>> path = Path(tempfile.mkdtemp()) / "model.onnx"
    >>> onnx.save(helper.make_model(graph), str(path))
    >>> config = derive_onnx_config(path)
    >>> config["inputs"]
    [{'name': 'x', 'datatype': 'FP32', 'dims': [4]}]
    >>> config["outputs"]
    [{'name': 'y', 'datatype': 'FP32', 'dims': [3]}]
"""

from __future__ import annotations

import dataclasses
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from slimtorch.core.errors import ModelLoadError
from slimtorch.serve.model_config import ModelConfig

#: ONNX ``TensorProto.DataType`` -> (ONNX name, Open Inference Protocol datatype or None).
ELEM_TYPES: dict[int, tuple[str, str | None]] = {
    1: ("FLOAT", "FP32"),
    2: ("UINT8", "UINT8"),
    3: ("INT8", "INT8"),
    4: ("UINT16", "UINT16"),
    5: ("INT16", "INT16"),
    6: ("INT32", "INT32"),
    7: ("INT64", "INT64"),
    8: ("STRING", None),
    9: ("BOOL", "BOOL"),
    10: ("FLOAT16", "FP16"),
    11: ("DOUBLE", "FP64"),
    12: ("UINT32", "UINT32"),
    13: ("UINT64", "UINT64"),
    16: ("BFLOAT16", None),
}


@dataclasses.dataclass(frozen=True)
class GraphTensor:
    """An input or output of an ONNX graph.

    Attributes:
        name: Tensor name.
        elem_type: ONNX element type number (0 when not a tensor or not given).
        shape: One entry per dimension, ``None`` for a dynamic one; ``None`` when the graph
            gives no shape.
    """

    name: str
    elem_type: int = 0
    shape: tuple[int | None, ...] | None = None

    @property
    def datatype(self) -> str | None:
        """The Open Inference Protocol datatype, or ``None`` when the server has none for it."""
        return ELEM_TYPES.get(self.elem_type, ("", None))[1]

    def type_name(self) -> str:
        """The ONNX element type's name, e.g. ``FLOAT``."""
        return ELEM_TYPES.get(self.elem_type, (f"type {self.elem_type}", None))[0]


class _Malformed(Exception):
    pass


class ExternalDataError(ModelLoadError):
    """An external-data location of a graph that is outside its folder, or missing."""


def _varint(buf: Any, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: Any, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """``(field, a, b)`` per varint (``a`` = value) or length-delimited (``buf[a:b]``) field."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield field, value, -1
        elif wire == 2:
            size, pos = _varint(buf, pos, end)
            if pos + size > end:
                raise _Malformed
            yield field, pos, pos + size
            pos += size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise _Malformed
    if pos != end:
        raise _Malformed


def _text(buf: Any, a: int, b: int) -> str:
    return bytes(buf[a:b]).decode("utf-8", errors="replace")


def _value_info(buf: Any, start: int, end: int) -> GraphTensor:
    name, elem, shape = "", 0, None
    for f, a, b in _fields(buf, start, end):
        if f == 1 and b >= 0:  # ValueInfoProto.name
            name = _text(buf, a, b)
        elif f == 2 and b >= 0:  # .type: TypeProto
            for f2, a2, b2 in _fields(buf, a, b):
                if f2 != 1 or b2 < 0:  # TypeProto.tensor_type only
                    continue
                for f3, a3, b3 in _fields(buf, a2, b2):
                    if f3 == 1 and b3 < 0:  # Tensor.elem_type
                        elem = a3
                    elif f3 == 2 and b3 >= 0:  # Tensor.shape: TensorShapeProto
                        dims: list[int | None] = []
                        for f4, a4, b4 in _fields(buf, a3, b3):
                            if f4 == 1 and b4 >= 0:  # TensorShapeProto.dim
                                value = [
                                    v for f5, v, b5 in _fields(buf, a4, b4) if f5 == 1 and b5 < 0
                                ]
                                dims.append(value[0] if value and value[0] < 1 << 63 else None)
                        shape = tuple(dims)
    return GraphTensor(name, elem, shape)


def read_signature(path: Path) -> tuple[list[GraphTensor], list[GraphTensor]]:
    """The graph's inputs (initializers left out) and outputs.

    Raises:
        ModelLoadError: The file is empty, unreadable or not an ONNX model.
    """
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            inputs: list[GraphTensor] = []
            outputs: list[GraphTensor] = []
            initializers: set[str] = set()
            graphs = [(a, b) for f, a, b in _fields(buf, 0, len(buf)) if f == 7 and b >= 0]
            if not graphs:
                raise _Malformed
            for f, a, b in _fields(buf, *graphs[-1]):
                if b < 0:
                    continue
                if f == 11:  # GraphProto.input
                    inputs.append(_value_info(buf, a, b))
                elif f == 12:  # GraphProto.output
                    outputs.append(_value_info(buf, a, b))
                elif f == 5:  # GraphProto.initializer: TensorProto, name = 8
                    initializers.update(
                        _text(buf, a2, b2) for f2, a2, b2 in _fields(buf, a, b) if f2 == 8
                    )
    except (OSError, ValueError, _Malformed):
        raise ModelLoadError(
            f"{path} is not a readable ONNX model (empty, truncated or another kind of file); "
            "copy the ONNX file again or re-export it"
        ) from None
    return [t for t in inputs if t.name not in initializers], outputs


def _graph_tensors(buf: Any, start: int, end: int) -> Iterator[tuple[int, int]]:
    """``(a, b)`` of every TensorProto of a graph: initializers (sparse ones too) and node
    attribute tensors, subgraphs (``If``, ``Loop`` ...) included."""
    for f, a, b in _fields(buf, start, end):
        if b < 0:
            continue
        if f == 5:  # GraphProto.initializer
            yield a, b
        elif f == 15:  # GraphProto.sparse_initializer
            yield from _sparse_tensors(buf, a, b)
        elif f == 1:  # GraphProto.node
            yield from _node_tensors(buf, a, b)


def _sparse_tensors(buf: Any, start: int, end: int) -> Iterator[tuple[int, int]]:
    """The values and indices TensorProtos of a SparseTensorProto."""
    yield from ((a, b) for f, a, b in _fields(buf, start, end) if f in (1, 2) and b >= 0)


def _node_tensors(buf: Any, start: int, end: int) -> Iterator[tuple[int, int]]:
    """The TensorProtos of a NodeProto's attributes (attribute = 5), subgraphs included."""
    for f2, a2, b2 in _fields(buf, start, end):
        if f2 != 5 or b2 < 0:
            continue
        for f3, a3, b3 in _fields(buf, a2, b2):  # AttributeProto
            if b3 < 0:
                continue
            if f3 in (5, 10):  # t, tensors
                yield a3, b3
            elif f3 in (22, 23):  # sparse_tensor, sparse_tensors
                yield from _sparse_tensors(buf, a3, b3)
            elif f3 in (6, 11):  # g, graphs
                yield from _graph_tensors(buf, a3, b3)


def _model_tensors(buf: Any) -> Iterator[tuple[int, int]]:
    """Every TensorProto of a ModelProto: of each ``graph`` field (a parser merges repeated
    ones, so all count) and of the nodes of its local functions (``functions`` = 25,
    FunctionProto ``node`` = 7)."""
    for f, a, b in _fields(buf, 0, len(buf)):
        if b < 0:
            continue
        if f == 7:
            yield from _graph_tensors(buf, a, b)
        elif f == 25:
            for f2, a2, b2 in _fields(buf, a, b):
                if f2 == 7 and b2 >= 0:
                    yield from _node_tensors(buf, a2, b2)


def _external_location(buf: Any, start: int, end: int) -> str | None:
    """The external-data ``location`` of a TensorProto, or ``None`` when its data is inline."""
    location, external = None, False
    for f, a, b in _fields(buf, start, end):
        if f == 14 and b < 0:  # data_location: 1 = EXTERNAL
            external = a == 1
        elif f == 13 and b >= 0:  # external_data: StringStringEntryProto (key 1, value 2)
            entry = {f2: _text(buf, a2, b2) for f2, a2, b2 in _fields(buf, a, b) if b2 >= 0}
            if entry.get(1) == "location":
                location = entry.get(2, "")
    return location if external else None


def external_data_files(path: Path) -> list[Path]:
    """The files that the graph's tensors stored as external data name, each once.

    A ``location`` is relative to the folder of the ``.onnx`` file, and must stay inside it: a
    repository never reads files outside its version folders.

    Raises:
        ModelLoadError: The file is not a readable ONNX model.
        ExternalDataError: A location is absolute, leaves the model file's folder or names a
            file that is missing.
    """
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if not any(f == 7 and b >= 0 for f, a, b in _fields(buf, 0, len(buf))):
                raise _Malformed
            locations = [
                loc
                for a, b in _model_tensors(buf)
                if (loc := _external_location(buf, a, b)) is not None
            ]
    except (OSError, ValueError, _Malformed):
        raise ModelLoadError(
            f"{path} is not a readable ONNX model (empty, truncated or another kind of file); "
            "copy the ONNX file again or re-export it"
        ) from None
    files: list[Path] = []
    for loc in dict.fromkeys(locations):
        normal = os.path.normpath(loc) if loc else ""
        if not normal or os.path.isabs(normal) or normal == ".." or normal.startswith("../"):
            raise ExternalDataError(
                f"{path} stores weights in external data at {loc!r}, outside the model's "
                f"folder {path.parent}; a repository reads only its own folders, so save the "
                "external data next to model.onnx with a relative location (e.g. "
                "'model.onnx.data')"
            )
        file = path.parent / normal
        # as ONNX Runtime reads it: beside the model file's real location (a model linked from
        # a shared store takes its data from there), never outside that folder
        folder = os.path.dirname(os.path.realpath(path))
        real = os.path.realpath(os.path.join(folder, normal))
        if os.path.commonpath([real, folder]) != folder:  # a symlink out of the folder
            raise ExternalDataError(
                f"{path} stores weights in external data at {loc!r}, which links to {real}, "
                f"outside the model's folder {path.parent}; copy the file itself next to "
                "model.onnx"
            )
        if not os.path.isfile(real):
            raise ExternalDataError(
                f"{path} stores weights in external data at {loc!r}, but {file} is missing; "
                "copy it next to model.onnx"
            )
        files.append(Path(real))
    return files


def _config_template() -> str:
    return (
        '{"format": "onnx", "inputs": [{"name": "input", "datatype": "FP32", "dims": [1, 8, 8]}], '
        '"outputs": [{"name": "output", "datatype": "FP32", "dims": [10]}]} with the names the '
        "ONNX graph uses and dims without the batch dimension (docs/serve.md)"
    )


def derive_onnx_config(path: Path, *, batch_one: bool = False) -> dict[str, Any]:
    """``inputs`` and ``outputs`` of a serving config, read from the ONNX graph (a first
    dimension fixed at 1 is taken as the batch when ``batch_one``: the config's
    ``max_batch_size`` is 1).

    Raises:
        ModelLoadError: The file is unreadable, or a tensor has no dynamic first dimension (the
            batch), no known rank, or an element type the server does not serve; the message
            says what ``config.json`` to write instead.
    """
    inputs, outputs = read_signature(path)
    return config_from_signature(path, inputs, outputs, _config_template(), batch_one=batch_one)


def config_from_signature(
    path: Path,
    inputs: list[GraphTensor],
    outputs: list[GraphTensor],
    template: str,
    *,
    batch_one: bool = False,
) -> dict[str, Any]:
    """``inputs`` and ``outputs`` of a serving config from a model file's tensors (ONNX graph
    or torch.export program): the dynamic first dimension is the batch (or, with
    ``batch_one``, a first dimension fixed at 1), the rest are ``dims``.

    Raises:
        ModelLoadError: A tensor the server cannot serve that way; the message names it and
            shows ``template``, the ``config.json`` to write instead.
    """
    out: dict[str, Any] = {}
    for label, tensors in (("inputs", inputs), ("outputs", outputs)):
        specs = []
        for t in tensors:
            why = ""
            if t.datatype is None:
                why = f"has element type {t.type_name()}, which the server does not serve"
            elif t.shape is None:
                why = "has no shape in the graph"
            elif not t.shape:
                why = "is a scalar, without the batch dimension the server needs"
            elif t.shape[0] is not None and not (batch_one and t.shape[0] == 1):
                why = f"has a fixed first dimension {t.shape[0]} instead of a dynamic batch"
                if t.shape[0] == 1:
                    why += " (with max_batch_size 1 in config.json it is read as the batch)"
            if why:
                raise ModelLoadError(
                    f"cannot read the serving config from {path}: {label[:-1]} {t.name!r} {why}; "
                    f"write config.json, e.g. {template}"
                )
            assert t.shape is not None
            dims = [-1 if d is None else d for d in t.shape[1:]]
            specs.append({"name": t.name, "datatype": t.datatype, "dims": dims})
        out[label] = specs
    return out


def check_onnx_config(path: Path, config: ModelConfig) -> None:
    """Check the config's tensor names, input datatypes and input dims against the graph.

    Raises:
        ModelLoadError: The message names the tensor and what the graph has.
    """
    inputs, outputs = read_signature(path)
    names = [t.name for t in inputs]
    wanted = [s.name for s in config.inputs]
    if sorted(names) != sorted(wanted):
        raise ModelLoadError(
            f"{path} takes inputs {names} but the model config lists {wanted}; make the config's "
            "input names match the ONNX graph"
        )
    outs = [t.name for t in outputs]
    missing = [s.name for s in config.outputs if s.name not in outs]
    if missing:
        raise ModelLoadError(
            f"{path} has outputs {outs}; the model config lists {missing} that it lacks; make "
            "the config's output names match the ONNX graph"
        )
    graph = {t.name: t for t in inputs}
    check_input_tensors(path, config, [graph[spec.name] for spec in config.inputs])


def check_input_tensors(path: Path, config: ModelConfig, tensors: list[GraphTensor]) -> None:
    """Check each of ``config.inputs`` against the model file's tensor in the same place of
    ``tensors``: its datatype, its dims and a batch dimension the config's batching can use.

    Raises:
        ModelLoadError: The message names the input and what the file has.
    """
    for spec, t in zip(config.inputs, tensors, strict=True):
        if t.datatype is not None and t.datatype != spec.datatype:
            raise ModelLoadError(
                f"input {spec.name!r} of {path} is {t.type_name()} ({t.datatype}) but the model "
                f"config says {spec.datatype}; fix the config's datatype"
            )
        if t.shape is None:
            continue
        want = [None if d == -1 else d for d in spec.dims]
        fits = len(t.shape) == len(want) + 1 and all(
            g is None or w is None or g == w for g, w in zip(t.shape[1:], want, strict=True)
        )
        if not fits:
            shown = ["?" if d is None else d for d in t.shape]
            raise ModelLoadError(
                f"input {spec.name!r} of {path} has shape {shown} (batch first) but the model "
                f"config says {[-1, *spec.dims]}; fix the config's dims"
            )
        first = t.shape[0]
        if first is not None and (first != 1 or config.max_batch_size > 1):
            raise ModelLoadError(
                f"input {spec.name!r} of {path} has a fixed batch of {first}; export the model "
                "with a dynamic batch (slimtorch export does)"
                + (", or set max_batch_size 1 in the config" if first == 1 else "")
            )


__all__ = [
    "ELEM_TYPES",
    "GraphTensor",
    "check_input_tensors",
    "check_onnx_config",
    "config_from_signature",
    "derive_onnx_config",
    "read_signature",
]
