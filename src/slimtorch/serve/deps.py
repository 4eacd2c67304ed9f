"""Typed FastAPI dependencies: the server, its parts, and the management API key check."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from slimtorch.serve.errors import Forbidden, Unauthorized
from slimtorch.serve.metrics import ServeMetrics
from slimtorch.serve.server import ModelServer

_api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="management API key (SLIMTORCH_SERVE_API_KEY)"
)


async def get_server(request: Request) -> ModelServer:
    """The app's :class:`ModelServer`."""
    server: ModelServer = request.app.state.server
    return server


async def get_metrics(request: Request) -> ServeMetrics:
    """The app's metrics."""
    metrics: ServeMetrics = request.app.state.server.metrics
    return metrics


ServerDep = Annotated[ModelServer, Depends(get_server)]
MetricsDep = Annotated[ServeMetrics, Depends(get_metrics)]


async def require_api_key(
    server: ServerDep, key: Annotated[str | None, Security(_api_key_header)] = None
) -> None:
    """Allow the request only with the configured management key in ``X-API-Key``."""
    expected = server.settings.api_key
    if expected is None:
        raise Forbidden(
            "the management endpoints are disabled; start the server with "
            "SLIMTORCH_SERVE_API_KEY set (or --api-key) and send it in the X-API-Key header"
        )
    if key is None or not hmac.compare_digest(key.encode(), expected.encode()):
        raise Unauthorized("missing or wrong X-API-Key header; send the server's management key")


AdminDep = Depends(require_api_key)
