"""``slimtorch serve``: the inference server (KServe v2 REST, dynamic batching, cache).

Options override the ``SLIMTORCH_SERVE_*`` environment variables.

Example:
    $ slimtorch serve --repository models --port 8000
    $ slimtorch serve            # serves the model directories make demo wrote under runs/
"""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="serve models over HTTP (Open Inference Protocol / KServe v2)",
        description="Serve a model repository (one folder per model, numbered versions) over "
        "the Open Inference Protocol with dynamic batching and a memory-bounded cache. "
        "Without --repository, serves the slimtorch model directories under runs/. "
        "Options override SLIMTORCH_SERVE_* environment variables.",
    )
    p.add_argument("--repository", default=None, help="model repository folder")
    p.add_argument(
        "--runs-dir",
        default=None,
        help="where the default repository looks for model directories (runs)",
    )
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="TCP port (default 8000)")
    p.add_argument("--device", default=None, help="default device: auto, cpu, cuda:N ...")
    p.add_argument(
        "--memory-budget",
        type=int,
        default=None,
        help="bytes of device memory for resident models (default: 80%% of it)",
    )
    p.add_argument("--load-policy", choices=["on_demand", "startup"], default=None)
    p.add_argument("--pin", default=None, help="comma-separated models to keep loaded")
    p.add_argument(
        "--api-key", default=None, help="management API key (prefer SLIMTORCH_SERVE_API_KEY)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--log-format", choices=["text", "json"], default="text")
    p.add_argument("--no-access-log", action="store_true", help="no log line per request")
    p.set_defaults(handler=run)


def settings_from_args(args: argparse.Namespace) -> Any:
    """``ServeSettings`` from the environment with the given options on top."""
    from slimtorch.serve.settings import ServeSettings

    overrides: dict[str, Any] = {}
    for opt, field in (
        ("repository", "repository"),
        ("runs_dir", "runs_dir"),
        ("host", "host"),
        ("port", "port"),
        ("device", "device"),
        ("memory_budget", "memory_budget_bytes"),
        ("load_policy", "load_policy"),
        ("api_key", "api_key"),
        ("threads", "threads"),
    ):
        value = getattr(args, opt, None)
        if value is not None:
            overrides[field] = value
    if getattr(args, "pin", None):
        overrides["pinned"] = tuple(n.strip() for n in args.pin.split(",") if n.strip())
    if getattr(args, "no_access_log", False):
        overrides["access_log"] = False
    return ServeSettings.from_env(**overrides)


def check_settings(settings: Any) -> None:
    """Refuse, before the server starts, a repository that is not a folder and a device that
    does not exist here (the server would start and then fail at start-up or on every model)."""
    from pathlib import Path

    from slimtorch.core.devices import resolve_device

    if settings.repository is not None and not Path(settings.repository).is_dir():
        raise ValueError(
            f"model repository {settings.repository} (from --repository or "
            "SLIMTORCH_SERVE_REPOSITORY) is not a folder; pass --repository DIR holding one "
            "folder per model (or unset both to serve the model directories under --runs-dir)"
        )
    resolve_device(settings.device)


def run(args: argparse.Namespace) -> int:
    import logging

    from slimtorch.core.errors import require_modules
    from slimtorch.serve.logs import configure_logging
    from slimtorch.serve.run import run_server

    require_modules("fastapi", "uvicorn", "prometheus_client", purpose="slimtorch serve")
    settings = settings_from_args(args)
    check_settings(settings)
    configure_logging(
        args.log_format, logging.DEBUG if getattr(args, "verbose", False) else logging.INFO
    )
    run_server(settings)
    return 0
