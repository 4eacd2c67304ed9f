"""Inference server: model repository, memory-bounded cache, dynamic batching, KServe v2 API.

``import slimtorch.serve`` stays light; the FastAPI app is built by :func:`create_app`, which
imports FastAPI when called.

Example:
    >>> from slimtorch.serve import ServeSettings, create_app
    >>> app = create_app(ServeSettings(repository="models", api_key="a-long-secret"))
    >>> app.title
    'slimtorch inference server'
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from slimtorch.serve.settings import ServeSettings

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["ServeSettings", "create_app", "run_server"]


def create_app(settings: ServeSettings | None = None) -> FastAPI:
    """Build the FastAPI app (see :func:`slimtorch.serve.app.create_app`)."""
    from slimtorch.serve.app import create_app as _create_app

    return _create_app(settings)


def run_server(settings: ServeSettings | None = None, **uvicorn_kwargs: Any) -> None:
    """Serve until interrupted (see :func:`slimtorch.serve.run.run_server`)."""
    from slimtorch.serve.run import run_server as _run

    _run(settings, **uvicorn_kwargs)
