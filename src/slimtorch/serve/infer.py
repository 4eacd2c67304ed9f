"""One inference request end to end: parse, check, batch, encode (shared by both HTTP paths).

Example:
    >>> content, headers = await run_infer(server, "mlp", None, body, None)
"""

from __future__ import annotations

import re

from slimtorch.serve.protocol.codec import encode_response, parse_request
from slimtorch.serve.server import ModelServer

#: ``/v2/models/{name}/infer`` and ``/v2/models/{name}/versions/{version}/infer``.
INFER_PATH = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer$")


async def run_infer(
    server: ModelServer,
    name: str,
    version: str | None,
    body: bytes,
    header_length: str | None,
) -> tuple[bytes, dict[str, str]]:
    """Answer a v2 inference request; returns the response body and headers.

    Raises:
        ServeError: Bad request (400), unknown model (404), not ready or overloaded (503).
    """
    decoded = parse_request(body, header_length)
    entry, ver, outputs = await server.infer(name, version, decoded)
    assert entry.config is not None
    content, json_len = encode_response(
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
