"""The ASGI middleware's inference fast path, driven with raw ASGI messages."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from slimtorch.serve.metrics import ServeMetrics
from slimtorch.serve.middleware import ServeMiddleware
from slimtorch.serve.server import ModelServer
from slimtorch.serve.settings import ServeSettings


async def _no_app(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("the fast path answers inference requests itself")


def _infer_once(repo: Path, body: bytes, headers: list[tuple[bytes, bytes]]) -> tuple[Any, ...]:
    """Run one inference request through the middleware of a started server; returns the
    messages sent and the cancellation requests left pending on the task afterwards."""
    scope = {"type": "http", "method": "POST", "path": "/v2/models/mlp/infer",
             "headers": [(b"content-length", str(len(body)).encode()), *headers]}  # fmt: skip
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(dict(message))

    async def main() -> int:
        server = ModelServer(ServeSettings(repository=str(repo), device="cpu", threads=1))
        await server.start()
        try:
            app = ServeMiddleware(
                _no_app, metrics=server.metrics, max_bytes=1 << 20, access_log=False, server=server
            )
            await app(scope, receive, send)
            task = asyncio.current_task()
            return task.cancelling() if task is not None else -1
        finally:
            await server.stop()

    pending = asyncio.run(main())
    return sent, pending


def test_non_utf8_header_length_is_a_bad_request(repo: Path) -> None:
    # HTTP header values are bytes; a client may send any of them (a TestClient sends UTF-8 only)
    x = {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}
    body = json.dumps({"inputs": [x]}).encode()
    sent, _ = _infer_once(repo, body, [(b"inference-header-content-length", b"\xff")])
    assert sent[0]["status"] == 400
    error = json.loads(sent[1]["body"])["error"]
    assert error.startswith("Inference-Header-Content-Length is '\u00ff' but the body has")


def test_a_streamed_body_over_the_limit_is_refused_with_a_readable_413() -> None:
    # without a Content-Length the size is not known: the message used to read
    # "request body of more exceeds the limit of 2048 bytes"
    chunks = [b"x" * 500] * 10

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        raise AssertionError("the middleware stops a body over the limit")

    async def receive() -> dict[str, Any]:
        body = chunks.pop()
        return {"type": "http.request", "body": body, "more_body": bool(chunks)}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(dict(message))

    scope = {"type": "http", "method": "POST", "path": "/upload", "headers": []}
    middleware = ServeMiddleware(app, metrics=ServeMetrics(), max_bytes=2048, access_log=False)
    asyncio.run(middleware(scope, receive, send))
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["error"] == (
        "request body exceeds the limit of 2048 bytes; send smaller batches or raise "
        "SLIMTORCH_SERVE_MAX_REQUEST_BYTES"
    )


def test_a_request_cancelled_by_the_shutdown_gets_a_503_to_retry_elsewhere(
    repo: Path, monkeypatch: Any
) -> None:
    # past the graceful timeout uvicorn cancels the requests still running: they got its bare
    # plain-text 500 and a traceback each in the log
    import slimtorch.serve.middleware as middleware

    async def cancelled(*args: Any, **kwargs: Any) -> Any:
        raise asyncio.CancelledError

    monkeypatch.setattr(middleware, "run_infer", cancelled)
    sent, pending = _infer_once(repo, b'{"inputs": []}', [])
    assert pending == 0  # answered: no cancellation left to hit the task's next await
    assert sent[0]["status"] == 503 and (b"retry-after", b"1") in sent[0]["headers"]
    assert "shutting down" in json.loads(sent[1]["body"])["error"]
