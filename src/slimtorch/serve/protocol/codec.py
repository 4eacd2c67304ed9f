"""Tensors in and out of Open Inference Protocol messages, binary data extension included.

Binary tensor data extension (as in KServe v2 / Triton): the ``Inference-Header-Content-Length``
header gives the length of the JSON part at the start of the body; inputs whose
``parameters.binary_data_size`` is set take that many bytes, in input order, from the rest
(little-endian, row-major). Outputs asked for with ``parameters.binary_data: true`` (or every
output with the request parameter ``binary_data_output: true``) come back the same way.

Example:
    >>> req = parse_request(b'{"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32",'
    ...                     b' "data": [1, 2]}]}', None)
    >>> req.tensors["x"].dtype
    dtype('float32')
"""

from __future__ import annotations

import dataclasses
import json
import math
import zlib
from typing import Any

import numpy as np
from pydantic import ValidationError

from slimtorch.serve.errors import BadRequest, PayloadTooLarge
from slimtorch.serve.model_config import DATATYPES, ModelConfig, TensorSpec
from slimtorch.serve.protocol.schemas import InferenceRequest, format_validation_error

HEADER_LENGTH = "inference-header-content-length"
#: numpy kinds a JSON array may parse to, per kind of the tensor's datatype (JSON integers
#: parse as int64 whatever their sign; the range check below then applies).
_KINDS = {"b": "b", "u": "biu", "i": "biu", "f": "biuf"}
_DATATYPE_NAMES = {dtype: name for name, dtype in DATATYPES.items()}


@dataclasses.dataclass
class DecodedRequest:
    """A parsed inference request.

    Attributes:
        id: The client's request id, echoed back.
        tensors: Input name -> array with the shape the client gave.
        datatypes: Input name -> datatype the client declared.
        outputs: Requested output name -> send as binary; ``None`` means every output.
        binary_default: Send outputs not listed as binary (request ``binary_data_output``).
    """

    id: str | None
    tensors: dict[str, np.ndarray]
    datatypes: dict[str, str]
    outputs: dict[str, bool] | None
    binary_default: bool


def _flag(params: dict[str, Any] | None, key: str, where: str) -> bool:
    value = (params or {}).get(key, False)
    if not isinstance(value, bool):
        raise BadRequest(f"{where}.parameters.{key} must be true or false, got {value!r}")
    return value


_KIND_NAMES = {
    "b": "booleans",
    "i": "integers",
    "u": "integers",
    "f": "non-integer numbers",
    "U": "strings",
    "O": "values of mixed types",
}


def _first_bad(arr: np.ndarray, dtype: np.dtype[Any]) -> Any:
    """The first value that keeps ``arr`` from being ``dtype`` (for the error message)."""
    bad = arr.flat[0]
    if arr.dtype.kind == "f" and dtype.kind in "iu":
        bad = next((v for v in arr.flat if not float(v).is_integer()), bad)
    return bad.item() if isinstance(bad, np.generic) else bad


def _check_int_range(lo: Any, hi: Any, dtype: np.dtype[Any], where: str) -> None:
    info = np.iinfo(dtype)
    if lo < info.min or hi > info.max:
        raise BadRequest(
            f"{where}.data has values in [{lo}, {hi}], outside the range of {dtype} "
            f"[{info.min}, {info.max}]"
        )


def _exact_ints(data: list[Any], dtype: np.dtype[Any], where: str) -> np.ndarray | None:
    """JSON integers for an integer tensor that numpy parsed as float64 (values on both sides
    of 2**63) or as Python objects (a value beyond 64 bits), range-checked exactly; ``None``
    when ``data`` holds anything but integers."""
    obj = np.asarray(data, dtype=object)
    if not all(type(v) is int for v in obj.flat):
        return None
    _check_int_range(min(obj.flat), max(obj.flat), dtype, where)
    return obj.astype(dtype)


def _float_range_error(value: str, dtype: np.dtype[Any], where: str, name: str) -> BadRequest:
    return BadRequest(
        f"{where}.data of input {name!r} holds {value}, outside the range of datatype "
        f"{_DATATYPE_NAMES[dtype]} (largest finite value {np.finfo(dtype).max!s}); send values "
        "within that range"
    )


def _big_ints_as_floats(
    data: list[Any], dtype: np.dtype[Any], where: str, name: str
) -> np.ndarray | None:
    """JSON numbers for a float tensor that numpy parsed as Python objects (an integer beyond
    64 bits) as float64; ``None`` when ``data`` holds anything but numbers."""
    obj = np.asarray(data, dtype=object)
    if not all(isinstance(v, int | float) for v in obj.flat):
        return None
    values = []
    for v in obj.flat:
        try:
            values.append(float(v))
        except OverflowError:  # an integer beyond float64, too long to quote
            shown = f"an integer of {v.bit_length()} bits"
            raise _float_range_error(shown, dtype, where, name) from None
    return np.array(values, dtype=np.float64).reshape(obj.shape)


def _as_float(arr: np.ndarray, dtype: np.dtype[Any], where: str, name: str) -> np.ndarray:
    """``arr`` cast to the float ``dtype``; a finite value the cast makes infinite is refused."""
    with np.errstate(over="ignore"):
        out = arr.astype(dtype, copy=False)
    if out is not arr and arr.dtype.kind in "iuf" and not np.isfinite(out).all():
        over = np.flatnonzero(np.isinf(out) & np.isfinite(arr))
        if over.size:
            bad = arr.reshape(-1)[over[0]].item()
            raise _float_range_error(repr(bad), dtype, where, name)
    return out


def _from_json(data: list[Any], dtype: np.dtype[Any], where: str, name: str) -> np.ndarray:
    """The JSON ``data`` of input ``name`` (at ``where`` in the request) as ``dtype``.

    Raises:
        BadRequest: Ragged lists, values of another kind, or values outside ``dtype``'s range.
    """
    try:
        arr = np.asarray(data)
        if arr.size and dtype.kind in "iu" and arr.dtype.kind in "fO":
            exact = _exact_ints(data, dtype, where)
            arr = arr if exact is None else exact
        elif arr.size and dtype.kind == "f" and arr.dtype.kind == "O":
            floats = _big_ints_as_floats(data, dtype, where, name)
            arr = arr if floats is None else floats
    except (ValueError, TypeError) as exc:
        raise BadRequest(
            f"{where}.data is not a regular (rectangular) array of numbers ({exc}); send a flat "
            "row-major list or nested lists of equal length"
        ) from None
    if arr.size and arr.dtype.kind not in _KINDS[dtype.kind]:
        expected = {"b": "booleans", "u": "non-negative integers", "i": "integers"}.get(
            dtype.kind, "numbers"
        )
        raise BadRequest(
            f"{where}.data must hold {expected} for datatype {dtype}, got "
            f"{_KIND_NAMES.get(arr.dtype.kind, arr.dtype.kind)} such as {_first_bad(arr, dtype)!r}"
        )
    if arr.size and dtype.kind in "iu" and arr.dtype.kind in "iu":
        _check_int_range(arr.min(), arr.max(), dtype, where)
    if dtype.kind == "f":
        return _as_float(arr, dtype, where, name)
    return arr.astype(dtype, copy=False)


def predict_batch(data: list[Any], spec: TensorSpec) -> np.ndarray:
    """The input batch of the simple JSON endpoint (``/v1/models/{m}/predict``).

    ``data`` is always a list of items, the batch. Each item has the input's full item shape
    (``dims``), or that shape without its leading size-1 dimensions: for dims ``[1, 8, 8]`` an
    item is an 8x8 nested list or a ``[1, 8, 8]`` one, and ``[img]`` is a batch of one.

    Raises:
        BadRequest: The items have another shape; the message lists the accepted ones.

    Example:
        >>> spec = TensorSpec(name="input", dims=(1, 8, 8))
        >>> img = [[0.0] * 8] * 8
        >>> predict_batch([img], spec).shape, predict_batch([img, img], spec).shape
        ((1, 1, 8, 8), (2, 1, 8, 8))
        >>> predict_batch([[img], [img]], spec).shape
        (2, 1, 8, 8)
        >>> predict_batch(img, spec)
        Traceback (most recent call last):
        ...
        slimtorch.serve.errors.BadRequest: request.data must be a list of items of shape ...
    """
    arr = _from_json(data, spec.dtype, "request", spec.name)
    dims = spec.dims
    accepted = [dims[k:] for k in range(len(dims) + 1) if all(d == 1 for d in dims[:k])]
    item = arr.shape[1:]
    for shape in accepted:
        if len(shape) == len(item) and all(d in (-1, g) for d, g in zip(shape, item, strict=True)):
            return arr.reshape(arr.shape[0], *dims[: len(dims) - len(shape)], *item)
    shown = " or ".join(str(list(a)) for a in accepted)
    raise BadRequest(
        f"request.data must be a list of items of shape {shown} (input {spec.name!r} takes "
        f"{[-1, *dims]}, batch first, -1 = any size); got {arr.shape[0]} item(s) of shape "
        f"{list(item)}; send one item as [item]"
    )


def _tensor(inp: Any, index: int, binary: memoryview, offset: int) -> tuple[np.ndarray, int]:
    where = f"inputs[{index}]"
    dtype = DATATYPES.get(inp.datatype)
    if dtype is None:
        raise BadRequest(
            f"{where}.datatype {inp.datatype!r} is not supported; expected one of "
            f"{', '.join(DATATYPES)}"
        )
    shape = tuple(inp.shape)
    count = math.prod(shape)
    size = (inp.parameters or {}).get("binary_data_size")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise BadRequest(
                f"{where}.parameters.binary_data_size must be an integer >= 0, got {size!r}"
            )
        if inp.data is not None:
            raise BadRequest(f"{where} has both data and binary_data_size; send one of them")
        if size != count * dtype.itemsize:
            raise BadRequest(
                f"{where}.parameters.binary_data_size is {size} bytes but shape {list(shape)} "
                f"of {inp.datatype} needs {count * dtype.itemsize}"
            )
        if offset + size > len(binary):
            raise BadRequest(
                f"{where} needs {size} bytes of binary data at offset {offset}, but the binary "
                f"part holds {len(binary)}; check Inference-Header-Content-Length"
            )
        if dtype.kind == "b":
            _check_bool_bytes(np.frombuffer(binary[offset : offset + size], np.uint8), where, inp)
        arr = np.frombuffer(binary[offset : offset + size], dtype=dtype.newbyteorder("<"))
        return _reshape(arr.astype(dtype, copy=False), shape, where), offset + size
    if inp.data is None:
        raise BadRequest(f"{where} has no data; send data or parameters.binary_data_size")
    arr = _from_json(inp.data, dtype, where, inp.name)
    if arr.size != count:
        raise BadRequest(
            f"{where}.data holds {arr.size} values but shape {list(shape)} needs {count}"
        )
    return _reshape(arr, shape, where), offset


def _check_bool_bytes(raw: np.ndarray, where: str, inp: Any) -> None:
    """Binary BOOL data is one byte per element, 0 or 1; numpy would keep any other byte."""
    bad = np.flatnonzero(raw > 1)
    if bad.size:
        raise BadRequest(
            f"{where} ({inp.name!r}) of datatype BOOL has byte {raw[bad[0]]} at element "
            f"{bad[0]} of its binary data; send each BOOL element as one byte, 0 (false) or "
            "1 (true)"
        )


def _reshape(arr: np.ndarray, shape: tuple[int, ...], where: str) -> np.ndarray:
    try:
        return arr.reshape(shape)
    except ValueError:  # a zero-size shape with a dimension numpy cannot index
        raise BadRequest(
            f"{where}.shape {list(shape)} has a dimension too large for an array; send the "
            "tensor's real shape"
        ) from None


def decode_body(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The request body after its ``Content-Encoding`` (``gzip``, ``deflate`` or none), as
    ``tritonclient`` sends it with ``request_compression_algorithm``.

    Raises:
        PayloadTooLarge: The body inflates past ``limit`` bytes (it is not inflated further).
        BadRequest: A corrupt or truncated compressed body, or another encoding.

    Example:
        >>> import gzip
        >>> decode_body(gzip.compress(b'{"inputs": []}'), "gzip", 1024)
        b'{"inputs": []}'
    """
    name = (encoding or "identity").strip().lower()
    if name == "identity":
        return body
    if name not in ("gzip", "x-gzip", "deflate"):
        raise BadRequest(
            f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or none"
        )
    # gzip: a gzip header; deflate: zlib's format (what HTTP means by it) or raw deflate
    tries = (16 + zlib.MAX_WBITS,) if name != "deflate" else (zlib.MAX_WBITS, -zlib.MAX_WBITS)
    for wbits in tries:
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(body, limit + 1)
        except zlib.error:
            continue
        if len(out) > limit:
            raise PayloadTooLarge(
                f"the request body inflates to more than the limit of {limit} bytes; send "
                "smaller batches or raise SLIMTORCH_SERVE_MAX_REQUEST_BYTES"
            )
        if inflater.eof and not inflater.unused_data:
            return out
    raise BadRequest(f"the body is not complete {name} data; compress the whole body once")


def parse_request(body: bytes, header_length: str | None) -> DecodedRequest:
    """Parse a v2 inference request body (JSON, or JSON header + binary tensors).

    Raises:
        BadRequest: Malformed JSON, a bad field, or data that does not fit its shape.
    """
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            n = -1
        if not 0 <= n <= len(body):
            raise BadRequest(
                f"Inference-Header-Content-Length is {header_length!r} but the body has "
                f"{len(body)} bytes; it must give the length of the JSON part"
            )
        head, binary = body[:n], memoryview(body)[n:]
    else:
        head, binary = body, memoryview(b"")
    try:
        req = InferenceRequest.model_validate_json(head)
    except ValidationError as exc:
        raise BadRequest(format_validation_error(exc)) from None
    tensors: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    offset = 0
    for i, inp in enumerate(req.inputs):
        if inp.name in tensors:
            raise BadRequest(f"inputs[{i}].name {inp.name!r} is given twice")
        tensors[inp.name], offset = _tensor(inp, i, binary, offset)
        datatypes[inp.name] = inp.datatype
    if offset != len(binary):
        raise BadRequest(
            f"the binary part has {len(binary)} bytes but the inputs use {offset}; check "
            "binary_data_size and Inference-Header-Content-Length"
        )
    binary_default = _flag(req.parameters, "binary_data_output", "request")
    outputs = None
    if req.outputs is not None:
        outputs = {}
        for i, out in enumerate(req.outputs):
            if (out.parameters or {}).get("classification"):
                raise BadRequest(
                    f"outputs[{i}].parameters.classification is not supported; "
                    "ask for the raw output"
                )
            outputs[out.name] = _flag(out.parameters, "binary_data", f"outputs[{i}]") or (
                binary_default and "binary_data" not in (out.parameters or {})
            )
    return DecodedRequest(req.id, tensors, datatypes, outputs, binary_default)


def _check_requested(requested: dict[str, bool] | None, config: ModelConfig) -> None:
    unknown = [n for n in requested or () if config.output(n) is None]
    if unknown:
        raise BadRequest(
            f"outputs {unknown} are not outputs of model {config.name!r}; it has "
            f"{[s.name for s in config.outputs]}"
        )


def check_inputs(req: DecodedRequest, config: ModelConfig) -> int:
    """Check names, datatypes, shapes and NaN against the model config, and that the outputs
    asked for exist; return the batch size.

    Raises:
        BadRequest: The message names the input (or output) and what the model has.
    """
    _check_requested(req.outputs, config)  # before the model runs, not after
    expected = [s.name for s in config.inputs]
    missing = [n for n in expected if n not in req.tensors]
    extra = [n for n in req.tensors if config.input(n) is None]
    if missing or extra:
        raise BadRequest(
            f"model {config.name!r} takes inputs {expected}; "
            + (f"missing {missing}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"unexpected {extra}" if extra else "")
        )
    batch = None
    for spec in config.inputs:
        arr = req.tensors[spec.name]
        if req.datatypes[spec.name] != spec.datatype:
            raise BadRequest(
                f"input {spec.name!r} of model {config.name!r} has datatype {spec.datatype}, "
                f"got {req.datatypes[spec.name]}"
            )
        want = [-1, *spec.dims]
        ok = arr.ndim == len(want) and all(
            w == -1 or w == g for w, g in zip(want[1:], arr.shape[1:], strict=True)
        )
        if not ok:
            raise BadRequest(
                f"input {spec.name!r} of model {config.name!r} must have shape {want} (batch "
                f"first, -1 = any), got {list(arr.shape)}"
            )
        if 0 in arr.shape[1:]:
            raise BadRequest(
                f"input {spec.name!r} of model {config.name!r} has shape {list(arr.shape)}; "
                "a dimension of any size (-1) still needs at least one element"
            )
        if batch is None:
            batch = arr.shape[0]
        elif arr.shape[0] != batch:
            raise BadRequest(
                f"input {spec.name!r} has batch size {arr.shape[0]} but other inputs have "
                f"{batch}; every input must have the same first dimension"
            )
        if (
            arr.dtype.kind == "f"
            and not spec.allow_nan
            and arr.size
            and not (np.isfinite(arr).all())
        ):
            raise BadRequest(
                f"input {spec.name!r} of model {config.name!r} holds NaN or infinite values; "
                f'send finite numbers (or set "allow_nan": true on input {spec.name!r} in the '
                "inputs list of the model's config.json)"
            )
    assert batch is not None
    if batch < 1:
        raise BadRequest(f"the batch dimension must be >= 1, got {batch}")
    if batch > config.max_batch_size:
        raise BadRequest(
            f"batch size {batch} exceeds max_batch_size {config.max_batch_size} of model "
            f"{config.name!r}; split the request"
        )
    return batch


def encode_response(
    *,
    model: str,
    version: str,
    request_id: str | None,
    outputs: dict[str, np.ndarray],
    config: ModelConfig,
    requested: dict[str, bool] | None,
    binary_default: bool,
) -> tuple[bytes, int | None]:
    """Encode a response; returns ``(body, json_length)``, ``json_length`` set when binary.

    Raises:
        BadRequest: An output was asked for that the model does not have.
    """
    _check_requested(requested, config)
    wanted = {s.name: binary_default for s in config.outputs} if requested is None else requested
    items = []
    chunks: list[bytes] = []
    for name, as_binary in wanted.items():
        spec = config.output(name)
        assert spec is not None
        arr = outputs[name]
        item: dict[str, Any] = {"name": name, "datatype": spec.datatype, "shape": list(arr.shape)}
        if as_binary:
            raw = np.ascontiguousarray(arr, dtype=spec.dtype.newbyteorder("<")).tobytes()
            item["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            item["data"] = arr.reshape(-1).tolist()
        items.append(item)
    doc: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": items}
    if request_id is not None:
        doc["id"] = request_id
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not chunks:
        return head, None
    return b"".join([head, *chunks]), len(head)
