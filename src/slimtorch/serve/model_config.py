"""The serving config of one model: tensor names, shapes, datatypes, batching, device, memory.

A model folder of the repository holds ``config.json`` (this config) and numbered version
sub-folders. Tensor ``dims`` exclude the batch dimension, which every request carries first;
``-1`` marks a dimension of any size. Fields left out take the server's defaults.

Example ``config.json``::

    {"format": "slimtorch",
     "inputs": [{"name": "input", "datatype": "FP32", "dims": [1, 28, 28]}],
     "outputs": [{"name": "logits", "datatype": "FP32", "dims": [10]}],
     "max_batch_size": 32, "max_queue_delay_ms": 2, "device": "cpu",
     "memory_bytes": 4000000, "pinned": false}
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from slimtorch.core.config import Config, check_choice, check_range
from slimtorch.serve.settings import LOAD_POLICIES, ServeSettings

FORMATS = ("slimtorch", "torch_export", "onnx")

#: Open Inference Protocol datatypes a model tensor may have, and their numpy dtypes.
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TensorSpec(Config):
    """One input or output tensor.

    Attributes:
        name: Tensor name in requests and responses.
        datatype: Open Inference Protocol datatype (``FP32``, ``INT64`` ...).
        dims: Shape without the batch dimension; ``-1`` for any size.
        allow_nan: Accept NaN and infinities in this (floating) input.
    """

    name: str
    datatype: str = "FP32"
    dims: tuple[int, ...] = ()
    allow_nan: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"TensorSpec.name must be a non-empty string, got {self.name!r}")
        check_choice(self, "datatype", self.datatype, DATATYPES)
        dims = tuple(self.dims)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in dims):
            raise ValueError(
                f"TensorSpec.dims of {self.name!r} must be integers >= 1 or -1, got {self.dims!r}"
            )
        if 0 in dims:
            raise ValueError(f"TensorSpec.dims of {self.name!r} must not contain 0")
        object.__setattr__(self, "dims", dims)

    @property
    def dtype(self) -> np.dtype[Any]:
        """The numpy dtype of ``datatype``."""
        return DATATYPES[self.datatype]

    def metadata(self) -> dict[str, Any]:
        """Open Inference Protocol tensor metadata (shape with ``-1`` for the batch)."""
        return {"name": self.name, "datatype": self.datatype, "shape": [-1, *self.dims]}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig(Config):
    """How one model is served.

    Attributes:
        name: Model name (the folder name).
        format: ``slimtorch`` (model directory), ``torch_export`` (``model.pt2``) or ``onnx``
            (``model.onnx``).
        inputs: Input tensors, in the order the model takes them.
        outputs: Output tensors, in the order the model returns them.
        max_batch_size: Largest batch (summed over the requests gathered) run at once.
        max_queue_delay_ms: Longest wait for a batch to fill; only spent under load.
        max_queue_size: Requests that may wait in the queue; more get 503 with Retry-After.
        device: Device to run on; ``None`` takes the server default.
        memory_bytes: Device memory the model needs; ``None`` estimates it (see
            :func:`slimtorch.serve.runners.estimate_memory`).
        pinned: Load at start-up and never evict.
        load_policy: ``on_demand`` or ``startup``; ``None`` takes the server's load policy.
        versions: ``"latest"`` (serve the highest version), ``"all"``, or a list of versions.
        labels: Class names of a classifier's output (used by the simple JSON endpoint).
        instances: Batches of this model that may run at the same time.
    """

    name: str
    format: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 32
    max_queue_delay_ms: float = 2.0
    max_queue_size: int = 256
    device: str | None = None
    memory_bytes: int | None = None
    pinned: bool = False
    load_policy: str | None = None
    versions: str | tuple[int, ...] = "latest"
    labels: tuple[str, ...] = ()
    instances: int = 1

    def __post_init__(self) -> None:
        check_choice(self, "format", self.format, FORMATS)
        for label, specs in (("inputs", self.inputs), ("outputs", self.outputs)):
            if not specs or not all(isinstance(s, TensorSpec) for s in specs):
                raise ValueError(f"ModelConfig.{label} must list at least one tensor")
            names = [s.name for s in specs]
            if len(set(names)) != len(names):
                raise ValueError(f"ModelConfig.{label} has duplicate names: {names}")
        check_range(self, "max_batch_size", self.max_batch_size, low=1)
        check_range(self, "max_queue_delay_ms", self.max_queue_delay_ms, low=0.0)
        check_range(self, "max_queue_size", self.max_queue_size, low=1)
        check_range(self, "instances", self.instances, low=1)
        if self.memory_bytes is not None:
            check_range(self, "memory_bytes", self.memory_bytes, low=1)
        if self.load_policy is not None:
            check_choice(self, "load_policy", self.load_policy, LOAD_POLICIES)
        if self.device is not None and not isinstance(self.device, str):
            raise ValueError(
                f"ModelConfig.device must be a device name such as 'cpu' or 'cuda:0', "
                f"got {self.device!r}"
            )
        if isinstance(self.versions, str):
            check_choice(self, "versions", self.versions, ("latest", "all"))
        elif (
            not isinstance(self.versions, tuple | list)
            or not self.versions
            or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in self.versions
            )
        ):
            raise ValueError(
                f"ModelConfig.versions must be 'latest', 'all' or a non-empty list of "
                f"integers >= 0, got {self.versions!r}"
            )
        else:
            object.__setattr__(self, "versions", tuple(self.versions))
        object.__setattr__(self, "labels", tuple(str(x) for x in self.labels))

    def input(self, name: str) -> TensorSpec | None:
        """The input named ``name``, or ``None``."""
        return next((s for s in self.inputs if s.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        """The output named ``name``, or ``None``."""
        return next((s for s in self.outputs if s.name == name), None)


_SCALARS = (
    "format",
    "max_batch_size",
    "max_queue_delay_ms",
    "max_queue_size",
    "device",
    "memory_bytes",
    "pinned",
    "load_policy",
    "instances",
)


def _tensors(data: Any, where: str) -> tuple[TensorSpec, ...]:
    if not isinstance(data, list):
        raise ValueError(f"{where} must be a list of tensor objects, got {type(data).__name__}")
    out = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise ValueError(f"{where}[{i}] must be an object with name, datatype and dims")
        unknown = sorted(set(item) - {"name", "datatype", "dims", "allow_nan"})
        if unknown:
            raise ValueError(
                f"{where}[{i}] has unknown key(s) {unknown}; valid: name, datatype, dims, allow_nan"
            )
        try:
            dims = item.get("dims", ())
            if not isinstance(dims, list | tuple):
                raise ValueError(f"dims must be a list of integers, got {dims!r}")
            allow_nan = item.get("allow_nan", False)
            if not isinstance(allow_nan, bool):
                raise ValueError(
                    f"allow_nan must be true or false, got {allow_nan!r}; write it without quotes"
                )
            out.append(
                TensorSpec(
                    name=item.get("name", ""),
                    datatype=item.get("datatype", "FP32"),
                    dims=tuple(dims),
                    allow_nan=allow_nan,
                )
            )
        except ValueError as exc:
            raise ValueError(f"{where}[{i}]: {exc}") from None
    return tuple(out)


def parse_model_config(
    data: dict[str, Any],
    *,
    name: str,
    settings: ServeSettings,
    derived: dict[str, Any] | None = None,
) -> ModelConfig:
    """Build a :class:`ModelConfig` from a parsed ``config.json``.

    Fields missing from ``data`` come from ``derived`` (what the model files say, e.g. a
    slimtorch model directory's input shape), then from ``settings`` (batching defaults).

    Raises:
        ValueError: An unknown key or a bad value; the message names the field.

    Example:
        >>> cfg = parse_model_config(
        ...     {"format": "onnx", "inputs": [{"name": "x", "dims": [4]}],
        ...      "outputs": [{"name": "y", "dims": [2]}]}, name="m", settings=ServeSettings())
        >>> cfg.max_batch_size
        32
    """
    if not isinstance(data, dict):
        raise ValueError(f"the model config must be a JSON object, got {type(data).__name__}")
    valid = {"name", "inputs", "outputs", "versions", "labels", *_SCALARS}
    unknown = sorted(set(data) - valid)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; valid keys: {sorted(valid)}")
    if "name" in data and data["name"] != name:
        raise ValueError(
            f"config name {data['name']!r} differs from the folder name {name!r}; "
            "rename one so they match (or drop 'name')"
        )
    merged: dict[str, Any] = {
        "max_batch_size": settings.max_batch_size,
        "max_queue_delay_ms": settings.max_queue_delay_ms,
        "max_queue_size": settings.max_queue_size,
        **(derived or {}),
        **{k: v for k, v in data.items() if k != "name"},
    }
    for key in ("inputs", "outputs"):
        if key not in merged:
            raise ValueError(f"the model config lacks '{key}'; list the model's {key}")
        if not (
            isinstance(merged[key], tuple) and all(isinstance(t, TensorSpec) for t in merged[key])
        ):
            merged[key] = _tensors(merged[key], key)
    if "format" not in merged:
        raise ValueError(f"the model config lacks 'format'; one of {list(FORMATS)}")
    versions = merged.get("versions", "latest")
    if isinstance(versions, list):
        merged["versions"] = tuple(versions)
    labels = merged.get("labels", ())
    if not isinstance(labels, list | tuple):
        raise ValueError(f"labels must be a list of strings, got {labels!r}")
    merged["labels"] = tuple(labels)
    for key in _SCALARS:
        value = merged.get(key)
        if key in ("max_batch_size", "max_queue_size", "instances", "memory_bytes") and (
            value is not None and (isinstance(value, bool) or not isinstance(value, int))
        ):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        if key == "pinned" and not isinstance(merged.get(key, False), bool):
            raise ValueError(f"pinned must be true or false, got {value!r}")
    return ModelConfig(name=name, **merged)
