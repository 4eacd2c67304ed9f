"""HTTP endpoints: Open Inference Protocol (KServe v2), a simple JSON endpoint, management.

Example:
    $ curl localhost:8000/v2/models/demo
    $ curl -X POST localhost:8000/v1/models/demo/predict -d '{"data": [[...8x8 inputs...]]}'
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from slimtorch import __version__
from slimtorch.serve.deps import AdminDep, ServerDep
from slimtorch.serve.errors import BadRequest, for_client
from slimtorch.serve.infer import OFF_LOOP_BYTES, off_loop, read_body_off_loop, run_infer
from slimtorch.serve.protocol.codec import (
    HEADER_LENGTH,
    DecodedRequest,
    predict_batch,
)
from slimtorch.serve.protocol.schemas import (
    ErrorResponse,
    HealthResponse,
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
    PredictRequest,
    PredictResponse,
    ReadyResponse,
    RepositoryIndexRequest,
    RepositoryModel,
    ServerMetadata,
    format_validation_error,
)
from slimtorch.serve.repository import ModelEntry, not_ready_reason, version_number

EXTENSIONS = ["binary_tensor_data", "model_repository", "simple_json"]
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 404, 413, 503)
}
_PLATFORMS = {
    "slimtorch": "pytorch_slimtorch",
    "torch_export": "pytorch_export",
    "onnx": "onnxruntime_onnx",
}

router = APIRouter()


def _label(request: Request, model: str, endpoint: str) -> None:
    request.state.model = model
    request.state.endpoint = endpoint


# -- health and metadata -------------------------------------------------------------------
@router.get(
    "/v2/health/live",
    response_model=HealthResponse,
    response_model_exclude_none=True,
    tags=["health"],
)
async def live(request: Request) -> dict[str, bool]:
    """The process is up."""
    _label(request, "", "health")
    return {"live": True}


@router.get(
    "/v2/health/ready",
    response_model=HealthResponse,
    response_model_exclude_none=True,
    tags=["health"],
    responses={503: {"model": HealthResponse}},
)
async def ready(request: Request, server: ServerDep) -> Any:
    """The server accepts requests (200) or is starting or stopping (503)."""
    _label(request, "", "health")
    if server.ready:
        return {"ready": True}
    return JSONResponse({"ready": False}, status_code=503)


@router.get("/v2", response_model=ServerMetadata, tags=["metadata"])
async def server_metadata(request: Request) -> dict[str, Any]:
    """Server name, version and protocol extensions."""
    _label(request, "", "metadata")
    return {"name": "slimtorch", "version": __version__, "extensions": EXTENSIONS}


def _metadata(entry: ModelEntry, version: str | None) -> dict[str, Any]:
    cfg = entry.config
    assert cfg is not None
    versions = [str(v) for v in sorted(entry.versions)] if version is None else [version]
    return {
        "name": entry.name,
        "versions": versions,
        "platform": _PLATFORMS[cfg.format],
        "inputs": [s.metadata() for s in cfg.inputs],
        "outputs": [s.metadata() for s in cfg.outputs],
    }


@router.get(
    "/v2/models/{model_name}", response_model=ModelMetadata, tags=["metadata"], responses=_ERRORS
)
async def model_metadata(model_name: str, request: Request, server: ServerDep) -> Any:
    """Inputs, outputs, versions and platform of a model."""
    entry, _ = server.repository.version(model_name, None)
    _label(request, model_name, "metadata")
    return _metadata(entry, None)


@router.get(
    "/v2/models/{model_name}/versions/{model_version}",
    response_model=ModelMetadata,
    tags=["metadata"],
    responses=_ERRORS,
)
async def version_metadata(
    model_name: str, model_version: str, request: Request, server: ServerDep
) -> Any:
    """Metadata of one version."""
    entry, ver = server.repository.version(model_name, model_version)
    _label(request, model_name, "metadata")
    return _metadata(entry, str(ver.version))


@router.get("/v2/models/{model_name}/config", tags=["metadata"], responses=_ERRORS)
async def model_config(model_name: str, request: Request, server: ServerDep) -> Any:
    """The model's resolved serving config."""
    entry, _ = server.repository.version(model_name, None)
    _label(request, model_name, "metadata")
    assert entry.config is not None
    return entry.config.to_dict()


def _ready(server: Any, request: Request, name: str, version: str | None) -> Any:
    entry = server.repository.get(name)
    _label(request, name, "ready")
    if version is None:
        ver = entry.latest()
    else:
        number = version_number(version)
        if number is None or number not in entry.versions:
            server.repository.version(name, version)  # raises NotFound with the versions
        assert number is not None
        ver = entry.versions[number]
    reason = not_ready_reason(entry, ver)
    if reason is None and server.ready:
        return {"name": name, "ready": True}
    reason = for_client(reason or "server not ready", server.settings.folders)
    return JSONResponse({"name": name, "ready": False, "reason": reason}, status_code=503)


@router.get(
    "/v2/models/{model_name}/ready",
    response_model=ReadyResponse,
    tags=["health"],
    responses={404: {"model": ErrorResponse}, 503: {"model": ReadyResponse}},
)
async def model_ready(model_name: str, request: Request, server: ServerDep) -> Any:
    """200 when the model serves requests (in memory or loadable on demand), else 503."""
    return _ready(server, request, model_name, None)


@router.get(
    "/v2/models/{model_name}/versions/{model_version}/ready",
    response_model=ReadyResponse,
    tags=["health"],
    responses={404: {"model": ErrorResponse}, 503: {"model": ReadyResponse}},
)
async def version_ready(
    model_name: str, model_version: str, request: Request, server: ServerDep
) -> Any:
    """Readiness of one version."""
    return _ready(server, request, model_name, model_version)


# -- inference -----------------------------------------------------------------------------
_INFER_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "JSON header (Inference-Header-Content-Length bytes) followed "
                "by binary tensor data",
            },
        },
    },
    "parameters": [
        {
            "name": "Inference-Header-Content-Length",
            "in": "header",
            "required": False,
            "schema": {"type": "integer", "minimum": 0},
            "description": "length of the JSON part when binary tensor data follows",
        }
    ],
}


async def _infer(server: Any, request: Request, name: str, version: str | None) -> Response:
    _label(request, name if name in server.repository.models else "", "infer")
    body = await request.body()
    content, headers = await run_infer(
        server,
        name,
        version,
        body,
        request.headers.get(HEADER_LENGTH),
        request.headers.get("content-encoding"),
    )
    return Response(content, headers=headers)


@router.post(
    "/v2/models/{model_name}/infer",
    response_model=InferenceResponse,
    tags=["inference"],
    responses=_ERRORS,
    openapi_extra=_INFER_DOC,
)
async def infer(model_name: str, request: Request, server: ServerDep) -> Response:
    """Run the latest version on typed tensors (JSON or binary tensor data)."""
    return await _infer(server, request, model_name, None)


@router.post(
    "/v2/models/{model_name}/versions/{model_version}/infer",
    response_model=InferenceResponse,
    tags=["inference"],
    responses=_ERRORS,
    openapi_extra=_INFER_DOC,
)
async def infer_version(
    model_name: str, model_version: str, request: Request, server: ServerDep
) -> Response:
    """Run one version."""
    return await _infer(server, request, model_name, model_version)


_PREDICT_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
    }
}


@router.post(
    "/v1/models/{model_name}/predict",
    response_model=PredictResponse,
    tags=["inference"],
    responses=_ERRORS,
    openapi_extra=_PREDICT_DOC,
)
async def predict(model_name: str, request: Request, server: ServerDep) -> Response:
    """Simple JSON: ``{"data": [item, ...]}``, a batch of the model's one input.

    Each item has the input's dims, or those dims without their leading size-1 dimensions
    (see :func:`~slimtorch.serve.protocol.codec.predict_batch`). For a classifier (a float
    first output of shape ``[batch, classes]``) the response adds the top class of each item:
    index, label (``null`` without labels in the config) and softmax score. The body is read as
    JSON whatever its Content-Type says (``curl -d`` sends a form type), after its
    Content-Encoding (gzip, deflate) as on ``/v2``.
    """
    cfg = server.repository.get(model_name).config
    if cfg is None:  # a broken model: the version lookup below says why
        server.repository.version(model_name, None)
    assert cfg is not None
    raw = await read_body_off_loop(
        server, await request.body(), request.headers.get("content-encoding"), cfg
    )
    try:
        body = await off_loop(len(raw) > OFF_LOOP_BYTES, PredictRequest.model_validate_json, raw)
    except ValidationError as exc:
        raise BadRequest(format_validation_error(exc)) from None
    entry, ver = server.repository.version(model_name, body.version)
    _label(request, model_name, "predict")
    cfg = entry.config
    assert cfg is not None
    if len(cfg.inputs) != 1:
        raise BadRequest(
            f"model {model_name!r} takes {len(cfg.inputs)} inputs; use "
            f"/v2/models/{model_name}/infer"
        )
    spec = cfg.inputs[0]
    arr = await off_loop(len(raw) > OFF_LOOP_BYTES, predict_batch, body.data, spec)
    decoded = DecodedRequest(None, {spec.name: arr}, {spec.name: spec.datatype}, None, False)
    entry, ver, outputs = await server.infer(model_name, str(ver.version), decoded)
    out: dict[str, Any] = {
        "model": model_name,
        "version": str(ver.version),
        "outputs": {k: v.tolist() for k, v in outputs.items()},
    }
    first = outputs[cfg.outputs[0].name]
    if first.ndim == 2 and first.shape[1] >= 2 and first.dtype.kind == "f":
        labels = cfg.labels if len(cfg.labels) == first.shape[1] else None
        out["predictions"] = top_classes(first, labels)
    # json, not the response model: NaN and infinities stay NaN / Infinity as in /v2
    return Response(json.dumps(out, separators=(",", ":")), media_type="application/json")


def top_classes(logits: np.ndarray, labels: tuple[str, ...] | None) -> list[dict[str, Any]]:
    """Each row's top class: index, label and softmax score.

    A row holding NaN has no top class (all three ``None``). Infinite logits are taken as
    limits: ``+inf`` wins (ties share the probability), ``-inf`` gets probability 0.

    Example:
        >>> top_classes(np.array([[0.0, 2.0], [np.inf, 1.0], [np.nan, 1.0]]), ("a", "b"))
        ... # doctest: +NORMALIZE_WHITESPACE
        [{'index': 1, 'label': 'b', 'score': 0.8807970779778823},
         {'index': 0, 'label': 'a', 'score': 1.0},
         {'index': None, 'label': None, 'score': None}]
    """
    rows: list[dict[str, Any]] = []
    for row in logits.astype(np.float64):
        if np.isnan(row).any() or np.isneginf(row).all():
            rows.append({"index": None, "label": None, "score": None})
            continue
        if np.isposinf(row).any():
            probs = np.isposinf(row) / np.isposinf(row).sum()
        else:
            probs = np.exp(row - row.max())
            probs /= probs.sum()
        i = int(probs.argmax())
        rows.append({"index": i, "label": labels[i] if labels else None, "score": float(probs[i])})
    return rows


# -- management ----------------------------------------------------------------------------
_INDEX_DOC: dict[str, Any] = {
    "requestBody": {
        "required": False,
        "content": {"application/json": {"schema": RepositoryIndexRequest.model_json_schema()}},
    }
}


@router.post(
    "/v2/repository/index",
    response_model=list[RepositoryModel],
    tags=["management"],
    dependencies=[AdminDep],
    responses={code: {"model": ErrorResponse} for code in (400, 401, 403)},
    openapi_extra=_INDEX_DOC,
)
async def repository_index(request: Request, server: ServerDep) -> list[dict[str, str]]:
    """Every model version with its state and, when not ready, the reason.

    The optional body ``{"ready": true}`` lists only the ready ones; it is read as JSON
    whatever its Content-Type says (``curl -d`` sends a form type).
    """
    _label(request, "", "management")
    raw = await request.body()
    try:
        body = RepositoryIndexRequest.model_validate_json(raw) if raw.strip() else None
    except ValidationError as exc:
        raise BadRequest(format_validation_error(exc)) from None
    rows = server.repository.index()
    if body is not None and body.ready:
        rows = [r for r in rows if r["state"] in ("READY", "AVAILABLE")]
    return rows


@router.post(
    "/v2/repository/rescan",
    response_model=list[RepositoryModel],
    tags=["management"],
    dependencies=[AdminDep],
)
async def repository_rescan(request: Request, server: ServerDep) -> list[dict[str, str]]:
    """Re-read the repository now; models added, changed or removed take effect."""
    _label(request, "", "management")
    await server.rescan()
    return server.repository.index()


def _repository_entries(versions: Any) -> list[dict[str, Any]]:
    """The repository-index entries of a model's versions after a load or unload."""
    return [
        {"name": v.model, "version": str(v.version), "state": v.state.value, "reason": v.reason}
        for v in versions
    ]


@router.post(
    "/v2/repository/models/{model_name}/load",
    response_model=list[RepositoryModel],
    tags=["management"],
    dependencies=[AdminDep],
    responses=_ERRORS,
)
async def load_model(model_name: str, request: Request, server: ServerDep) -> list[Any]:
    """Load every served version of a model into memory now."""
    _label(request, "", "management")
    versions = await server.load(model_name)
    return _repository_entries(versions)


@router.post(
    "/v2/repository/models/{model_name}/unload",
    response_model=list[RepositoryModel],
    tags=["management"],
    dependencies=[AdminDep],
    responses=_ERRORS,
)
async def unload_model(model_name: str, request: Request, server: ServerDep) -> list[Any]:
    """Unload a model; it answers 503 until loaded again."""
    _label(request, "", "management")
    versions = await server.unload(model_name)
    return _repository_entries(versions)


@router.get("/metrics", tags=["metrics"], response_class=Response)
async def metrics(request: Request, server: ServerDep) -> Response:
    """Prometheus metrics."""
    _label(request, "", "metrics")
    body, content_type = server.metrics.render()
    return Response(body, media_type=content_type)


__all__ = ["EXTENSIONS", "InferenceRequest", "router"]
