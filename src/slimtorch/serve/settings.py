"""Server settings, read from ``SLIMTORCH_SERVE_*`` environment variables.

Every field of :class:`ServeSettings` has an environment variable named after it in upper case
(``repository`` -> ``SLIMTORCH_SERVE_REPOSITORY``); :meth:`ServeSettings.from_env` reads them and
validates the result like any other slimtorch config.

Example:
    >>> import os
    >>> os.environ["SLIMTORCH_SERVE_PORT"] = "9000"
    >>> ServeSettings.from_env().port
    9000
    >>> del os.environ["SLIMTORCH_SERVE_PORT"]
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from typing import Any

from slimtorch.core.config import Config, check_choice, check_range

ENV_PREFIX = "SLIMTORCH_SERVE_"
LOAD_POLICIES = ("on_demand", "startup")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServeSettings(Config):
    """How the inference server runs.

    Attributes:
        repository: Model repository folder; ``None`` serves the slimtorch model directories
            found under ``runs_dir`` (what ``make demo`` writes), one version each.
        runs_dir: Where the embedded default repository looks for model directories.
        host: Address to bind; loopback unless told otherwise.
        port: TCP port.
        memory_budget_bytes: Device memory the resident models may use; ``None`` takes
            ``memory_fraction`` of what the device reports.
        memory_fraction: Share of the device memory used when no byte budget is given.
        api_key: Key the management endpoints (load, unload, index, rescan) require in the
            ``X-API-Key`` header; ``None`` disables those endpoints.
        max_request_bytes: Largest request body accepted (413 beyond it).
        request_timeout_s: Longest a request may wait for its result (503 beyond it).
        device: Default device of the models (``auto``, ``cpu``, ``cuda:1`` ...); a model's
            config may name its own.
        load_policy: ``on_demand`` loads a model on its first request, ``startup`` loads every
            model before the server reports ready (pinned models always load at start-up); a
            model config's own ``load_policy`` wins. A model that fails to load at start-up is
            not ready, with the reason logged and given by its readiness endpoint.
        pinned: Model names that are loaded at start-up and never evicted, whatever their
            config's ``pinned`` says.
        threads: torch CPU threads (``None`` keeps torch's choice).
        max_batch_size: Default largest batch of a model whose config does not set one.
        max_queue_delay_ms: Default longest wait for a batch to fill, under load only.
        max_queue_size: Default bound of each model's queue, in requests.
        poll_interval_s: Re-scan the repository this often (0: only on request).
        access_log: Log one line per request.
        graceful_timeout_s: Longest shutdown waits for accepted requests to finish.
        max_connections: Open connections (and in-flight requests) uvicorn accepts before it
            answers 503 at once; bounds memory under overload. ``None``: no limit.
        fast_path: Answer the v2 inference endpoints in the ASGI middleware, skipping FastAPI's
            routing and dependency resolution (same code and responses; off for debugging).
    """

    repository: str | None = None
    runs_dir: str = "runs"
    host: str = "127.0.0.1"
    port: int = 8000
    memory_budget_bytes: int | None = None
    memory_fraction: float = 0.8
    api_key: str | None = None
    max_request_bytes: int = 64 * 1024 * 1024
    request_timeout_s: float = 30.0
    device: str = "auto"
    load_policy: str = "on_demand"
    pinned: tuple[str, ...] = ()
    threads: int | None = None
    max_batch_size: int = 32
    max_queue_delay_ms: float = 2.0
    max_queue_size: int = 256
    poll_interval_s: float = 0.0
    access_log: bool = True
    graceful_timeout_s: float = 30.0
    max_connections: int | None = 1024
    fast_path: bool = True

    def __post_init__(self) -> None:
        check_range(self, "port", self.port, low=0, high=65535)
        if self.memory_budget_bytes is not None:
            check_range(self, "memory_budget_bytes", self.memory_budget_bytes, low=1)
        check_range(
            self, "memory_fraction", self.memory_fraction, low=0.0, high=1.0, low_inclusive=False
        )
        check_range(self, "max_request_bytes", self.max_request_bytes, low=1024)
        check_range(self, "request_timeout_s", self.request_timeout_s, low=0.0, low_inclusive=False)
        check_choice(self, "load_policy", self.load_policy, LOAD_POLICIES)
        if self.threads is not None:
            check_range(self, "threads", self.threads, low=1)
        check_range(self, "max_batch_size", self.max_batch_size, low=1)
        check_range(self, "max_queue_delay_ms", self.max_queue_delay_ms, low=0.0)
        check_range(self, "max_queue_size", self.max_queue_size, low=1)
        check_range(self, "poll_interval_s", self.poll_interval_s, low=0.0)
        if self.max_connections is not None:
            check_range(self, "max_connections", self.max_connections, low=1)
        check_range(self, "graceful_timeout_s", self.graceful_timeout_s, low=0.0)
        if self.api_key is not None and len(self.api_key) < 8:
            raise ValueError(
                "ServeSettings.api_key must be at least 8 characters (or unset to disable the "
                f"management endpoints), got {len(self.api_key)} characters"
            )
        if isinstance(self.pinned, str):  # one name, not its letters
            raise ValueError(
                f"ServeSettings.pinned must be a tuple of model names, got the string "
                f"{self.pinned!r}; write ({self.pinned!r},)"
            )
        if not isinstance(self.pinned, tuple):
            object.__setattr__(self, "pinned", tuple(self.pinned))

    @property
    def folders(self) -> tuple[str | None, str]:
        """The folders models are read from (``repository``, ``runs_dir``): cut from the paths
        in answers to clients (:func:`slimtorch.serve.errors.for_client`)."""
        return (self.repository, self.runs_dir)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ServeSettings:
        """Settings from ``SLIMTORCH_SERVE_*`` variables, then ``overrides`` on top.

        Empty variables count as unset for optional fields. Booleans take 1/0, true/false,
        yes/no, on/off; ``PINNED`` is a comma-separated list of model names.

        Raises:
            ValueError: A variable cannot be parsed or is out of range; the message names it.

        Example:
            >>> ServeSettings.from_env({"SLIMTORCH_SERVE_ACCESS_LOG": "0"}).access_log
            False
        """
        env = os.environ if environ is None else environ
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            var = ENV_PREFIX + field.name.upper()
            if var not in env:
                continue
            try:
                values[field.name] = _parse(hints[field.name], env[var])
            except ValueError as exc:
                raise ValueError(f"environment variable {var}={env[var]!r}: {exc}") from None
        values.update(overrides)
        return cls(**values)


def _parse(hint: Any, text: str) -> Any:
    text = text.strip()
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional and text == "":
        return None
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if typing.get_origin(hint) is tuple:
        return tuple(p.strip() for p in text.split(",") if p.strip())
    if base is bool:
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError("expected a boolean (1/0, true/false, yes/no, on/off)")
    if base is int:
        try:
            return int(text.replace("_", ""))
        except ValueError:
            raise ValueError("expected an integer") from None
    if base is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError("expected a number") from None
    return text
