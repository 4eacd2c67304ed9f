"""Structured logs: a request id on every record, and a JSON formatter.

Example (JSON records on stdout, with the id of the request being handled):
    >>> import sys
    >>> handler = logging.StreamHandler(sys.stdout)
    >>> handler.setFormatter(JsonFormatter())
    >>> handler.addFilter(RequestIdFilter())
    >>> logger = logging.getLogger("slimtorch")
    >>> logger.addHandler(handler)
    >>> token = request_id.set("req-7")
    >>> logger.warning("model %s loaded", "mlp")
    {"time": "...", "level": "WARNING", ..., "message": "model mlp loaded", "request_id": "req-7"}
    >>> request_id.reset(token)
    >>> logger.removeHandler(handler)
"""

from __future__ import annotations

import contextvars
import json
import logging
import time

#: The id of the request being handled ("-" outside a request).
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "request_id"}
# uvicorn's copy of the message with terminal colours: the JSON records leave it out
_DROPPED = {"color_message"}


def logger_name(name: str) -> str:
    """The name a record's logger is shown by: uvicorn logs its start-up and shutdown lines
    under ``uvicorn.error``, which reads like an error, so that one shows as ``uvicorn``.

    Example:
        >>> logger_name("uvicorn.error"), logger_name("slimtorch.serve.server")
        ('uvicorn', 'slimtorch.serve.server')
    """
    return "uvicorn" if name == "uvicorn.error" else name


class TextFormatter(logging.Formatter):
    """``LEVEL logger [request id]: message``, with :func:`logger_name`.

    Example:
        >>> rec = logging.makeLogRecord({"msg": "Started", "levelname": "INFO",
        ...                              "name": "uvicorn.error", "request_id": "-"})
        >>> TextFormatter().format(rec)
        'INFO uvicorn [-]: Started'
    """

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s [%(request_id)s]: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        shown = logging.makeLogRecord(vars(record))  # a copy: other handlers see the record as is
        shown.name = logger_name(record.name)
        return super().format(shown)


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` from the current request's context."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger (by :func:`logger_name`), message, request id
    and any extras, less those holding terminal escapes (uvicorn's ``color_message``).

    Example:
        >>> rec = logging.makeLogRecord({"msg": "hi", "levelname": "INFO", "name": "x"})
        >>> json.loads(JsonFormatter().format(rec))["message"]
        'hi'
    """

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": logger_name(record.name),
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", request_id.get()),
        }
        for key, value in vars(record).items():
            if key in _STANDARD or key in _DROPPED or key.startswith("_"):
                continue
            if isinstance(value, str) and "\x1b" in value:  # terminal escapes: for a console
                continue
            doc[key] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure_logging(fmt: str = "text", level: int = logging.INFO) -> None:
    """Send logs to stderr as ``text`` (with the request id) or ``json``, once per process.

    Example (replaces the root logger's handlers; the last line puts the old ones back):
        >>> root = logging.getLogger()
        >>> saved = root.handlers[:], root.level
        >>> configure_logging("json")
        >>> [type(h.formatter).__name__ for h in root.handlers], root.level == logging.INFO
        (['JsonFormatter'], True)
        >>> configure_logging("xml")
        Traceback (most recent call last):
        ...
        ValueError: log format must be 'text' or 'json', got 'xml'
        >>> root.handlers[:], root.level = saved
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be 'text' or 'json', got {fmt!r}")
    root = logging.getLogger()
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
