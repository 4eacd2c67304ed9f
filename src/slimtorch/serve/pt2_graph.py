"""The inputs and outputs of a torch.export archive (``model.pt2``), read without loading it.

``torch.export.save`` writes a zip archive whose ``<root>/models/model.json`` is the serialized
program: its graph signature (which placeholders are user inputs, which outputs are user
outputs) and the metadata of every tensor value (dtype, sizes; a dynamic size is a symbolic
expression). This module reads that one JSON entry, never the weights, and does not unpickle
anything, so a repository scan can derive or check a serving config for a ``.pt2`` as it does
for an ``.onnx`` (:mod:`slimtorch.serve.onnx_graph`).

A ``.pt2`` program is called with its inputs in order and returns its outputs in order, so the
names are for clients only: inputs keep the program's argument names, a single output is called
``output`` (``output_0``, ``output_1`` ... for several), the names ``slimtorch export`` gives
the ONNX form of the same model.

The archive layout is torch's; when a torch version writes one this module cannot read, the
error says to write ``config.json`` (which always works).

Example:
    >>> import tempfile
    >>> import torch
    >>> from slimtorch.models import create_model, save_exported
    >>> path = Path(tempfile.mkdtemp()) / "model.pt2"
    >>> _ = save_exported(create_model("mlp", input_size=8), torch.randn(1, 1, 8, 8), path)
    >>> config = derive_pt2_config(path)
    >>> config["inputs"]
    [{'name': 'x', 'datatype': 'FP32', 'dims': [1, 8, 8]}]
    >>> config["outputs"]
    [{'name': 'output', 'datatype': 'FP32', 'dims': [10]}]
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from slimtorch.core.errors import ModelLoadError
from slimtorch.serve.model_config import ModelConfig
from slimtorch.serve.onnx_graph import GraphTensor, check_input_tensors, config_from_signature

#: torch.export's serialized ``ScalarType`` -> ONNX element type (what :class:`GraphTensor`
#: holds); dtypes the server does not serve map to 0.
SCALAR_TYPES: dict[int, int] = {
    1: 2,  # BYTE -> UINT8
    2: 3,  # CHAR -> INT8
    3: 5,  # SHORT -> INT16
    4: 6,  # INT -> INT32
    5: 7,  # LONG -> INT64
    6: 10,  # HALF -> FLOAT16
    7: 1,  # FLOAT
    8: 11,  # DOUBLE
    12: 9,  # BOOL
    13: 16,  # BFLOAT16
    28: 4,  # UINT16
    34: 12,  # UINT32
    35: 13,  # UINT64
}

MAX_JSON_BYTES = 64 << 20
"""A serialized program larger than this is not read at a scan (its graph, not its weights)."""


class _Unreadable(Exception):
    pass


class UnknownLayout(ModelLoadError):
    """The archive opens but its program is not laid out as this module reads it."""


def _program(path: Path) -> dict[str, Any]:
    with zipfile.ZipFile(path) as archive:
        entries = [i for i in archive.infolist() if i.filename.split("/")[-2:-1] == ["models"]]
        entries = [i for i in entries if i.filename.endswith("/models/model.json")] or entries
        if len(entries) != 1 or entries[0].file_size > MAX_JSON_BYTES:
            raise _Unreadable
        data = json.loads(archive.read(entries[0]))
    if not isinstance(data, dict):
        raise _Unreadable
    return data


def _tensor(name: str, meta: dict[str, Any]) -> GraphTensor:
    shape = tuple(int(size["as_int"]) if "as_int" in size else None for size in meta["sizes"])
    return GraphTensor(name, SCALAR_TYPES.get(int(meta["dtype"]), 0), shape)


def read_pt2_signature(path: Path) -> tuple[list[GraphTensor], list[GraphTensor]]:
    """The program's user inputs and user outputs, in call order.

    Raises:
        ModelLoadError: The file is not a torch.export archive, or one this module cannot
            read (another layout, or an input that is not a tensor).
    """
    try:
        program = _program(path)
        graph = program["graph_module"]["graph"]
        values = graph["tensor_values"]
        signature = program["graph_module"]["signature"]
        inputs = []
        for spec in signature["input_specs"]:
            if "user_input" in spec:
                name = spec["user_input"]["arg"]["as_tensor"]["name"]
                inputs.append(_tensor(name, values[name]))
        outputs = []
        user_outputs = [s for s in signature["output_specs"] if "user_output" in s]
        for i, spec in enumerate(user_outputs):
            label = "output" if len(user_outputs) == 1 else f"output_{i}"
            outputs.append(_tensor(label, values[spec["user_output"]["arg"]["as_tensor"]["name"]]))
    except (OSError, zipfile.BadZipFile, _Unreadable, RecursionError) as exc:
        raise ModelLoadError(
            f"{path} is not a readable torch.export archive ({type(exc).__name__}); save it "
            "again with torch.export.save (slimtorch export --format pt2)"
        ) from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UnknownLayout(
            f"cannot read the inputs and outputs of {path} (a layout this version does not "
            f"know, or a non-tensor input: {type(exc).__name__} {exc}); write config.json, "
            f"e.g. {_config_template()}"
        ) from None
    return inputs, outputs


def _config_template() -> str:
    return (
        '{"format": "torch_export", "inputs": [{"name": "input", "datatype": "FP32", '
        '"dims": [1, 8, 8]}], "outputs": [{"name": "logits", "datatype": "FP32", "dims": '
        "[10]}]} with the model's own dims, without the batch dimension (docs/serve.md)"
    )


def derive_pt2_config(path: Path, *, batch_one: bool = False) -> dict[str, Any]:
    """``inputs`` and ``outputs`` of a serving config, read from the ``.pt2`` program.

    Raises:
        ModelLoadError: The archive is unreadable, or a tensor has no dynamic first dimension
            (``slimtorch export`` writes a dynamic batch), or a dtype the server does not
            serve; the message says what ``config.json`` to write instead.
    """
    inputs, outputs = read_pt2_signature(path)
    return config_from_signature(path, inputs, outputs, _config_template(), batch_one=batch_one)


def check_pt2_config(path: Path, config: ModelConfig) -> None:
    """Check the config against the program: as many inputs and outputs, in order, and each
    input's datatype and dims.

    A program this module cannot read (:class:`UnknownLayout`) is left unchecked: the config
    is then the only description of it, as it was before the program was read at all.

    Raises:
        ModelLoadError: The message names what the program has.
    """
    try:
        inputs, outputs = read_pt2_signature(path)
    except UnknownLayout:
        return
    for label, have, listed in (
        ("inputs", inputs, config.inputs),
        ("outputs", outputs, config.outputs),
    ):
        if len(have) != len(listed):
            raise ModelLoadError(
                f"{path} has {len(have)} {label} but the model config lists {len(listed)} "
                f"({[s.name for s in listed]}); a .pt2 takes and returns its tensors in order, "
                f"so list one config entry for each"
            )
    check_input_tensors(path, config, inputs)


__all__ = [
    "SCALAR_TYPES",
    "UnknownLayout",
    "check_pt2_config",
    "derive_pt2_config",
    "read_pt2_signature",
]
