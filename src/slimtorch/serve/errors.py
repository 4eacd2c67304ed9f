"""Serving errors: each carries the HTTP status it is answered with.

Example:
    >>> err = Overloaded("queue of 'mlp' is full (256 requests)", retry_after=1)
    >>> err.status, err.retry_after
    (503, 1)
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from slimtorch.core.errors import SlimtorchError


class ServeError(SlimtorchError):
    """An error answered to the client with ``status`` and, for 503, ``Retry-After``."""

    status: int = 500

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class BadRequest(ServeError):
    """The request is malformed or does not match the model (400)."""

    status = 400


class InputFailed(BadRequest):
    """The model raised an error on this request's input, run on its own (400).

    A model that passed its warm-up and fails on one request's data (an index out of range, a
    shape its layers cannot take) fails for that request only: a batch that fails is run again
    request by request, so the other requests gathered with it still get their results.
    """


class Unauthorized(ServeError):
    """The API key is missing or wrong (401)."""

    status = 401


class Forbidden(ServeError):
    """The endpoint is disabled (403)."""

    status = 403


class NotFound(ServeError):
    """No such model or version (404)."""

    status = 404


class PayloadTooLarge(ServeError):
    """The request body exceeds the size limit (413)."""

    status = 413


class NotReady(ServeError):
    """The model is broken, unloaded, or failed to load (503)."""

    status = 503


class ModelFault(ServeError):
    """The model's outputs break the serving contract, e.g. they lose the batch dimension (500)."""

    status = 500


class Overloaded(ServeError):
    """The queue is full, the request timed out, or memory ran out (503 with Retry-After)."""

    status = 503


def for_client(text: str, roots: Iterable[str | None]) -> str:
    """``text`` with the path of each repository folder in ``roots`` cut off the paths in it,
    for an answer to a client: it learns which file of a model is wrong (``mlp/2/config.json``),
    not where the server keeps its files.

    Example:
        >>> for_client("/srv/models/mlp/2/config.json is not valid JSON", ["/srv/models"])
        'mlp/2/config.json is not valid JSON'
    """
    for root in roots:
        if not root:
            continue
        for form in sorted({str(Path(root)), str(Path(root).resolve())}, key=len, reverse=True):
            # a whole path's start only: runs/ in "myruns/m" is part of another folder's name
            text = re.sub(rf"(?<![\w.~/-]){re.escape(form + os.sep)}", "", text)
    return text


def printable(text: str) -> str:
    """``text`` with control characters escaped (``\\n`` for a newline): a client's URL in a
    text log line cannot start a forged line of its own.

    Example:
        >>> printable("/v2/models/x\\nINFO forged")
        '/v2/models/x\\\\nINFO forged'
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
