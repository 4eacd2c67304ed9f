"""ASGI middleware: request id, body size limit, request metrics, access log, inference fast path.

Pure ASGI (no per-request task or body buffering): a body over the limit is refused with 413
from its Content-Length, or as soon as the streamed bytes pass the limit.

The v2 inference endpoints are answered here directly, by the same code as their FastAPI
routes (:func:`slimtorch.serve.infer.run_infer`, same errors, same responses): on a small CPU,
routing and dependency resolution cost about as much as the model, and skipping them on the
hot path is what lets one process keep up with many clients. The FastAPI routes document the
endpoints in the OpenAPI schema and answer them when this middleware is not installed.

Example (on a bare FastAPI app, without the inference fast path):
    >>> from fastapi import FastAPI, Request
    >>> from fastapi.testclient import TestClient
    >>> app = FastAPI()
    >>> @app.post("/size")
    ... async def size(request: Request) -> int:
    ...     return len(await request.body())
    >>> app.add_middleware(ServeMiddleware, metrics=ServeMetrics(), max_bytes=1 << 20)
    >>> client = TestClient(app)
    >>> r = client.post("/size", content=b"x" * 1000, headers={"X-Request-ID": "req-7"})
    >>> r.status_code, r.json(), r.headers["x-request-id"]
    (200, 1000, 'req-7')
    >>> r = client.post("/size", content=b"x" * (2 << 20))
    >>> r.status_code, r.json()["error"]
    (413, 'request body of 2097152 bytes exceeds the limit of 1048576 bytes; ...')
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from slimtorch.serve.errors import NotReady, ServeError, for_client, printable
from slimtorch.serve.infer import INFER_PATH, run_infer
from slimtorch.serve.logs import request_id
from slimtorch.serve.metrics import ServeMetrics
from slimtorch.serve.server import ModelServer

access = logging.getLogger("slimtorch.serve.access")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def _uncancel() -> None:
    """Clear the current task's cancellation request once it has been answered (Python 3.11+
    counts them; a count left behind would cancel the next ``asyncio.timeout`` in the task)."""
    task = asyncio.current_task()
    if task is not None and hasattr(task, "uncancel"):
        task.uncancel()


class _TooLarge(Exception):
    pass


def _too_large(limit: int, size: int | None) -> bytes:
    body = f"request body of {size} bytes" if size is not None else "request body"
    return json.dumps(
        {
            "error": f"{body} exceeds the limit of {limit} bytes; "
            "send smaller batches or raise SLIMTORCH_SERVE_MAX_REQUEST_BYTES"
        }
    ).encode()


class ServeMiddleware:
    """Request id (``X-Request-ID``, kept from the client when well-formed), size limit,
    metrics by model/endpoint/status and one access-log record per request.

    Handlers name the model and endpoint of a request in ``scope["state"]`` (``model``,
    ``endpoint``); other requests count under ``model=""``.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: ServeMetrics,
        max_bytes: int,
        access_log: bool = True,
        server: ModelServer | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_bytes = max_bytes
        self.access_log = access_log
        self.server = server

    async def _infer(
        self,
        match: re.Match[str],
        scope: Scope,
        state: dict[str, Any],
        receive: Receive,
        send: Send,
        headers: dict[bytes, bytes],
    ) -> None:
        server = self.server
        assert server is not None
        name, version = match["name"], match["version"]
        state["endpoint"] = "infer"
        if name in server.repository.models:
            state["model"] = name
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        hl = headers.get(b"inference-header-content-length")
        header_length = None if hl is None else hl.decode("latin-1")  # as Starlette reads it
        ce = headers.get(b"content-encoding")
        encoding = None if ce is None else ce.decode("latin-1")
        status = 200
        try:
            content, out_headers = await run_infer(
                server, name, version, b"".join(chunks), header_length, encoding
            )
        except (ServeError, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError):  # the shutdown's grace period ran out
                _uncancel()  # (answered here: uvicorn would send a bare 500)
                exc = NotReady(
                    "the server is shutting down; retry on another server", retry_after=1
                )
            status = exc.status
            text = for_client(exc.message, server.settings.folders)
            content = json.dumps({"error": text}).encode()
            out_headers = {"content-type": "application/json"}
            if exc.retry_after is not None:
                out_headers["retry-after"] = str(exc.retry_after)
        except Exception as exc:
            access.exception("unexpected error in %s", scope.get("path"))
            status = 500
            content = json.dumps(
                {
                    "error": f"internal error ({type(exc).__name__}); "
                    "see the server log for this X-Request-ID"
                }
            ).encode()
            out_headers = {"content-type": "application/json"}
        raw = [(k.encode(), v.encode()) for k, v in out_headers.items()]
        raw.append((b"content-length", str(len(content)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": content})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")
        if not _ID.match(rid):
            rid = uuid.uuid4().hex
        token = request_id.set(rid)
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        status = 500
        started = False
        limit = self.max_bytes
        received = 0

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _TooLarge
            return message

        async def refuse(size: int | None) -> None:
            await send_wrapper(
                {
                    "type": "http.response.start",
                    "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
                }
            )
            await send_wrapper({"type": "http.response.body", "body": _too_large(limit, size)})

        try:
            length = headers.get(b"content-length")
            size = int(length) if length is not None and length.isdigit() else None
            match = INFER_PATH.match(scope["path"]) if self.server is not None else None
            if size is not None and size > limit:
                await refuse(size)
            elif match is not None and scope["method"] == "POST":
                await self._infer(match, scope, state, receive_limited, send_wrapper, headers)
            else:
                await self.app(scope, receive_limited, send_wrapper)
        except _TooLarge:
            if not started:
                await refuse(None)
        finally:
            seconds = time.perf_counter() - start
            model = str(state.get("model", ""))
            endpoint = str(state.get("endpoint", "other"))
            self.metrics.observe_request(model, endpoint, status, seconds)
            if self.access_log:
                path = printable(str(scope.get("path")))  # the client's: no forged log lines
                access.info(
                    "%s %s %d %.2f ms",
                    scope.get("method"),
                    path,
                    status,
                    seconds * 1000,
                    extra={
                        "method": scope.get("method"),
                        "path": path,
                        "status": status,
                        "duration_ms": round(seconds * 1000, 3),
                        "model": model,
                    },
                )
            request_id.reset(token)
