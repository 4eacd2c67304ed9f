"""The FastAPI app factory: lifespan, error handlers, middleware, OpenAPI schema.

Example (its last line starts a server that listens until interrupted, hence skipped as a test;
:func:`create_app` shows a test client that needs no server):
    >>> app = create_app(ServeSettings(repository="models"))
    >>> import uvicorn
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from slimtorch import __version__
from slimtorch.serve.errors import ServeError, for_client
from slimtorch.serve.metrics import ServeMetrics
from slimtorch.serve.middleware import ServeMiddleware
from slimtorch.serve.protocol.schemas import InferenceRequest
from slimtorch.serve.routes import router
from slimtorch.serve.server import ModelServer
from slimtorch.serve.settings import ServeSettings

logger = logging.getLogger(__name__)


async def _serve_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServeError)
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    if exc.status >= 500:
        logger.warning("%d: %s", exc.status, exc.message)
    message = for_client(exc.message, request.app.state.settings.folders)
    return JSONResponse({"error": message}, status_code=exc.status, headers=headers)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return JSONResponse(
        {"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers
    )


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        if err.get("type") == "json_invalid":
            parts.append("the body is not valid JSON; send a JSON object")
        else:
            parts.append(f"{loc}: {err.get('msg')}")
    return JSONResponse({"error": "; ".join(parts)}, status_code=400)


async def _pydantic_error(request: Request, exc: Exception) -> JSONResponse:
    from slimtorch.serve.protocol.schemas import format_validation_error

    assert isinstance(exc, ValidationError)
    return JSONResponse({"error": format_validation_error(exc)}, status_code=400)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error handling %s %s", request.method, request.url.path)
    return JSONResponse(
        {
            "error": f"internal error ({type(exc).__name__}); see the server log for the "
            "request id in X-Request-ID"
        },
        status_code=500,
    )


def create_app(settings: ServeSettings | None = None) -> FastAPI:
    """Build the inference server app.

    The lifespan scans the repository, starts one batcher per model version and loads the
    pinned (and, with ``load_policy="startup"``, all) models before the app takes requests;
    on shutdown it finishes the accepted requests and unloads the models.

    Args:
        settings: Server settings; ``None`` reads them from ``SLIMTORCH_SERVE_*``.

    Returns:
        The FastAPI app (``app.state.server`` is its :class:`ModelServer`).

    Example:
        >>> import tempfile, pathlib
        >>> from fastapi.testclient import TestClient
        >>> from slimtorch.models import create_model, save_model
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> model = create_model("mlp", input_size=8)
        >>> _ = save_model(model, d / "mlp" / "1", input_shape=(1, 8, 8), mean=[0.5], std=[0.5],
        ...                class_names=list("0123456789"))
        >>> x = {"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 128}
        >>> with TestClient(create_app(ServeSettings(repository=str(d), device="cpu"))) as client:
        ...     client.get("/v2/health/ready").status_code
        ...     r = client.post("/v2/models/mlp/infer", json={"inputs": [x]})
        ...     r.status_code, r.json()["outputs"][0]["shape"]
        200
        (200, [2, 10])
    """
    settings = settings or ServeSettings.from_env()
    metrics = ServeMetrics()
    server = ModelServer(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await server.start()
        try:
            yield
        finally:
            await server.stop()

    app = FastAPI(
        title="slimtorch inference server",
        version=__version__,
        description="Open Inference Protocol (KServe v2) REST API with dynamic batching, "
        "a simple JSON endpoint and model management.",
        lifespan=lifespan,
    )
    app.state.server = server
    app.state.settings = settings
    app.include_router(router)
    app.add_exception_handler(ServeError, _serve_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)  # 404, 405: same {"error"}
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ValidationError, _pydantic_error)
    app.add_exception_handler(Exception, _internal_error)
    app.add_middleware(
        ServeMiddleware,
        metrics=metrics,
        max_bytes=settings.max_request_bytes,
        access_log=settings.access_log,
        server=server if settings.fast_path else None,
    )

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            defs = InferenceRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, sub in defs.pop("$defs", {}).items():
                components.setdefault(name, sub)
            components["InferenceRequest"] = defs
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
