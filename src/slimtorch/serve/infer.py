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

import re

from slimtorch.serve.protocol.codec import decode_body, encode_response, parse_request
from slimtorch.serve.server import ModelServer

#: ``/v2/models/{name}/infer`` and ``/v2/models/{name}/versions/{version}/infer``.
INFER_PATH = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer$")


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
    server.repository.version(name, version)  # an unknown model is a 404 whatever the body
    body = decode_body(body, content_encoding, server.settings.max_request_bytes)
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
