"""One inference request end to end: parse, check, batch, encode (shared by both HTTP paths).

Example (a started server over a repository of one small model; ``run_infer`` is a coroutine):
    >>> import asyncio, json, tempfile, pathlib
    >>> from slimtorch.models import create_model, save_model
    >>> from slimtorch.serve.settings import ServeSettings
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = save_model(create_model("mlp"), d / "mlp" / "1", input_shape=(1, 28, 28), mean=[0.5],
    ...                std=[0.5], class_names=list("0123456789"))
    >>> x = {"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}
    >>> body = json.dumps({"id": "r1", "inputs": [x]}).encode()
    >>> async def main():
    ...     server = ModelServer(ServeSettings(repository=str(d), device="cpu"))
    ...     await server.start()
    ...     try:
    ...         return await run_infer(server, "mlp", None, body, None)
    ...     finally:
    ...         await server.stop()
    >>> content, headers = asyncio.run(main())
    >>> headers
    {'content-type': 'application/json'}
    >>> response = json.loads(content)
    >>> response["id"], response["model_version"], response["outputs"][0]["shape"]
    ('r1', '1', [1, 10])
"""

from __future__ import annotations

import asyncio
import math
import re
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from slimtorch.serve.errors import PayloadTooLarge
from slimtorch.serve.model_config import ModelConfig
from slimtorch.serve.protocol.codec import decode_body, encode_response, parse_request
from slimtorch.serve.server import ModelServer

#: ``/v2/models/{name}/infer`` and ``/v2/models/{name}/versions/{version}/infer``.
INFER_PATH = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer$")

JSON_BYTES_PER_VALUE = 64
"""Room for one tensor value in a request body: a float written out in full
(``-1.2345678901234567e-308`` is 24 characters) with the indentation and line break of a
pretty-printed nested list."""

OFF_LOOP_BYTES = 256 * 1024
"""Bodies (inflated) and responses larger than this are decoded and encoded on a worker thread:
parsing tens of megabytes of JSON takes seconds, and the event loop would answer nothing else
meanwhile, health checks included. Smaller ones stay on the loop (a thread hop costs more than
their parse)."""

T = TypeVar("T")


def request_byte_cap(config: ModelConfig, limit: int) -> int:
    """The largest body a valid request to the model can need (at most ``limit``): a batch of
    ``max_batch_size`` items of every input, each value written out as JSON, plus 64 KiB for the
    rest. A model with an input dimension of any size (-1) gets ``limit``.

    Example:
        >>> from slimtorch.serve.model_config import TensorSpec
        >>> x, y = TensorSpec(name="x", dims=(1, 28, 28)), TensorSpec(name="y", dims=(10,))
        >>> cfg = ModelConfig(name="m", format="onnx", inputs=(x,), outputs=(y,), max_batch_size=8)
        >>> request_byte_cap(cfg, 64 * 2**20)
        466944
    """
    values = 0
    for spec in config.inputs:
        if -1 in spec.dims:
            return limit
        values += math.prod(spec.dims)
    return min(limit, config.max_batch_size * values * JSON_BYTES_PER_VALUE + 64 * 1024)


def read_body(body: bytes, encoding: str | None, config: ModelConfig, limit: int) -> bytes:
    """``body`` after its Content-Encoding, refused (413) beyond what the model can take, sent
    compressed or not, so a small gzip body cannot make the server inflate and parse megabytes
    for a model whose requests are kilobytes.

    Raises:
        PayloadTooLarge: The body, or its inflated form, is over the model's cap.
        BadRequest: A corrupt compressed body or an unknown encoding.
    """
    cap = request_byte_cap(config, limit)
    if len(body) > cap:
        raise PayloadTooLarge(_over(config, cap))
    try:
        return decode_body(body, encoding, cap)
    except PayloadTooLarge:
        if cap == limit:
            raise
        raise PayloadTooLarge(_over(config, cap)) from None


def _over(config: ModelConfig, cap: int) -> str:
    return (
        f"the request body is over {cap} bytes, more than model {config.name!r} can take "
        f"(max_batch_size {config.max_batch_size} items of its inputs' dims); send a smaller "
        "batch or split the request"
    )


async def read_body_off_loop(
    server: ModelServer, body: bytes, encoding: str | None, config: ModelConfig
) -> bytes:
    """:func:`read_body` with the server's limit, on a worker thread where the body may
    inflate past :data:`OFF_LOOP_BYTES`."""
    limit = server.settings.max_request_bytes
    compressed = encoding is not None and encoding.strip().lower() != "identity"
    big = len(body) > OFF_LOOP_BYTES or (
        compressed and request_byte_cap(config, limit) > OFF_LOOP_BYTES
    )
    return await off_loop(big, read_body, body, encoding, config, limit)


BIG_WORK = 2
"""Big bodies parsed (and responses encoded) at once: a JSON parse holds 15-25 times the body in
Python objects, so their number is bounded as when the event loop did them one at a time."""

_SLOTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


async def off_loop(big: bool, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, on a worker thread when ``big`` (see :data:`OFF_LOOP_BYTES`),
    at most :data:`BIG_WORK` such at a time. The others wait on the event loop, not in the
    thread pool, where model loads and rescans would queue behind them."""
    if not big:
        return fn(*args, **kwargs)
    loop = asyncio.get_running_loop()
    slots = _SLOTS.setdefault(loop, asyncio.Semaphore(BIG_WORK))
    async with slots:
        return await asyncio.to_thread(fn, *args, **kwargs)


async def run_infer(
    server: ModelServer,
    name: str,
    version: str | None,
    body: bytes,
    header_length: str | None,
    content_encoding: str | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Answer a v2 inference request; returns the response body and headers.

    ``header_length`` is the ``Inference-Header-Content-Length`` header and
    ``content_encoding`` the ``Content-Encoding`` one (the JSON length counts the inflated body).

    Raises:
        ServeError: Bad request (400), unknown model (404), body over the limit once inflated
            (413), not ready or overloaded (503).
    """
    entry, _ = server.repository.version(name, version)  # unknown: a 404 whatever the body
    assert entry.config is not None
    body = await read_body_off_loop(server, body, content_encoding, entry.config)
    decoded = await off_loop(len(body) > OFF_LOOP_BYTES, parse_request, body, header_length)
    entry, ver, outputs = await server.infer(name, version, decoded)
    assert entry.config is not None
    size = sum(a.nbytes for a in outputs.values())
    content, json_len = await off_loop(
        size > OFF_LOOP_BYTES // 8,  # JSON text runs to several bytes a value
        encode_response,
        model=name,
        version=str(ver.version),
        request_id=decoded.id,
        outputs=outputs,
        config=entry.config,
        requested=decoded.outputs,
        binary_default=decoded.binary_default,
    )
    if json_len is None:
        return content, {"content-type": "application/json"}
    return content, {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(json_len),
    }
