"""Pydantic models of the Open Inference Protocol (KServe v2) REST messages.

The inference endpoints parse the JSON part of a request with :class:`InferenceRequest`
(pydantic's JSON parser, strict integers) and build responses as plain dicts for speed; the
response models here document them in the OpenAPI schema. Field names follow the protocol
(https://kserve.github.io/website/latest/modelserving/data_plane/v2_protocol/).

Example:
    >>> req = InferenceRequest.model_validate_json(
    ...     '{"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}')
    >>> req.inputs[0].shape
    [1, 2]
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

NonNegInt = Annotated[StrictInt, Field(ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RequestInput(_Strict):
    """One input tensor of a request: data inline (``data``) or in the binary part."""

    name: str = Field(min_length=1)
    shape: list[NonNegInt]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = Field(default=None, description="row-major, flat or nested")


class RequestOutput(_Strict):
    """An output the client asks for (``parameters.binary_data`` for a binary output)."""

    name: str = Field(min_length=1)
    parameters: dict[str, Any] | None = None


class InferenceRequest(_Strict):
    """The JSON body of ``POST /v2/models/{name}/infer`` (or its JSON header part)."""

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    """One output tensor of a response (``data`` absent when sent as binary)."""

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    """The JSON body (or JSON header part) of an inference response."""

    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[ResponseOutput]


class TensorMetadata(BaseModel):
    """Name, datatype and shape (``-1`` for a variable dimension) of a tensor."""

    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    """``GET /v2/models/{name}``."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(BaseModel):
    """``GET /v2``."""

    name: str
    version: str
    extensions: list[str]


class ReadyResponse(BaseModel):
    """Readiness of a model (``reason`` when it is not ready)."""

    name: str
    ready: bool
    reason: str | None = None


class HealthResponse(BaseModel):
    """``/v2/health/live`` and ``/v2/health/ready``."""

    live: bool | None = None
    ready: bool | None = None


class ErrorResponse(BaseModel):
    """Every error: what was wrong, what was expected, what to do."""

    error: str


class RepositoryIndexRequest(_Strict):
    """``POST /v2/repository/index``: ``ready`` lists only the ready models."""

    ready: bool = False


class RepositoryModel(BaseModel):
    """One model version in the repository index."""

    name: str
    version: str
    state: str
    reason: str = ""


class PredictRequest(_Strict):
    """The simple JSON endpoint: one input as a list of items (the batch), each of the input's
    dims or those dims without their leading size-1 dimensions."""

    data: list[Any] = Field(min_length=1)
    version: str | None = None


class Prediction(BaseModel):
    """Top class of one item for a classifier (all ``None`` when its logits hold NaN)."""

    index: int | None
    label: str | None = None
    score: float | None


class PredictResponse(BaseModel):
    """Outputs of the simple JSON endpoint (nested lists, batch first)."""

    model: str
    version: str
    outputs: dict[str, list[Any]]
    predictions: list[Prediction] | None = None


def format_validation_error(exc: ValidationError, root: str = "") -> str:
    """One line per problem, naming the field like ``inputs[0].shape[1]``.

    Example:
        >>> try:
        ...     InferenceRequest.model_validate_json('{"inputs": []}')
        ... except ValidationError as e:
        ...     message = format_validation_error(e)
        >>> message
        'inputs: List should have at least 1 item after validation, not 0 (got [])'
    """
    parts = []
    for err in exc.errors(include_url=False):
        loc = root
        for key in err["loc"]:
            loc += f"[{key}]" if isinstance(key, int) else (f".{key}" if loc else str(key))
        if err["type"] == "json_invalid":
            parts.append(f"the body is not valid JSON ({err['msg']}); send a JSON object")
            continue
        got = ""
        if err["type"] not in ("missing", "extra_forbidden") and "input" in err:
            text = repr(err["input"])
            got = f" (got {text[:60]}{'...' if len(text) > 60 else ''})"
        parts.append(f"{loc or 'body'}: {err['msg']}{got}")
    return "; ".join(parts)
