"""Run the server with uvicorn until SIGINT/SIGTERM, then shut down gracefully.

On a signal uvicorn stops accepting connections, waits up to ``graceful_timeout_s`` for the
requests already accepted, then the app's lifespan drains the batchers and unloads the models.

Example (serves until interrupted, hence skipped as a test; ``slimtorch.serve.create_app``
shows a test client that needs no server):
    >>> run_server(ServeSettings(repository="models", port=8000))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Any

from slimtorch.serve.settings import ServeSettings

logger = logging.getLogger(__name__)


def run_server(settings: ServeSettings | None = None, **uvicorn_kwargs: Any) -> None:
    """Serve ``create_app(settings)`` on ``settings.host:settings.port``.

    Args:
        settings: Server settings; ``None`` reads ``SLIMTORCH_SERVE_*``.
        **uvicorn_kwargs: Passed to ``uvicorn.Config`` (e.g. ``loop="uvloop"``).
    """
    import uvicorn

    from slimtorch.serve.app import create_app

    settings = settings or ServeSettings.from_env()
    if settings.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("binding to %s: the server is reachable from other machines", settings.host)
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,
        "access_log": False,
        "timeout_graceful_shutdown": settings.graceful_timeout_s,
        "lifespan": "on",
        "limit_concurrency": settings.max_connections,
    }
    options.update(uvicorn_kwargs)
    config = uvicorn.Config(create_app(settings), **options)
    uvicorn.Server(config).run()
