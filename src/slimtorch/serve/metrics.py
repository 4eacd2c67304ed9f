"""Prometheus metrics of one server, in a registry of its own (apps in one process never clash).

Example:
    >>> m = ServeMetrics()
    >>> m.requests.labels(model="mlp", endpoint="infer", status="200").inc()
    >>> b"slimtorch_serve_requests_total" in m.render()[0]
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
    30.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LOAD_RESULTS = ("ok", "error", "oom")
"""The ``result`` label values of ``model_loads``."""


def _remove(family: Any, *labels: str) -> None:
    """Drop one series; prometheus-client before 0.22 raises KeyError for one never recorded."""
    with contextlib.suppress(KeyError):
        family.remove(*labels)


class ServeMetrics:
    """Every metric the server exports.

    Attributes:
        registry: The app's own ``CollectorRegistry``.
        requests: Requests by model, endpoint and HTTP status.
        latency: Request latency in seconds by model, endpoint and status.
        queue_depth: Requests waiting per model.
        batch_size: Items per executed batch, per model.
        batch_seconds: Time to run one batch, per model.
        models_loaded: Model versions resident in memory.
        memory_used: Bytes the resident models need (by the cache's accounting).
        memory_budget: The cache's budget in bytes.
        loads: Model loads by model and result (ok, error, oom).
        evictions: Models evicted to make room, per model.
    """

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = "slimtorch_serve_"
        self.requests = Counter(
            p + "requests", "Requests answered", ["model", "endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            p + "request_duration_seconds",
            "Request latency from arrival to response",
            ["model", "endpoint", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(p + "queue_depth", "Requests waiting", ["model"], registry=r)
        self.batch_size = Histogram(
            p + "batch_size",
            "Items per executed batch",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            p + "batch_duration_seconds",
            "Time to run one batch",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.models_loaded = Gauge(p + "models_loaded", "Model versions resident", registry=r)
        self.memory_used = Gauge(
            p + "memory_used_bytes", "Bytes needed by the resident models", registry=r
        )
        self.memory_budget = Gauge(p + "memory_budget_bytes", "Memory budget", registry=r)
        self.loads = Counter(p + "model_loads", "Model loads", ["model", "result"], registry=r)
        self.evictions = Counter(
            p + "model_evictions", "Models evicted to make room", ["model"], registry=r
        )
        self._request_series: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    def observe_request(self, model: str, endpoint: str, status: int, seconds: float) -> None:
        """Count one answered request and its latency (each series' children looked up once)."""
        key = (model, endpoint, str(status))
        pair = self._request_series.get(key)
        if pair is None:
            pair = (self.requests.labels(*key), self.latency.labels(*key))
            self._request_series[key] = pair
        pair[0].inc()
        pair[1].observe(seconds)

    def forget_batchers(self, labels: Iterable[str]) -> None:
        """Drop the series of batchers that no longer run (a version retired by a rescan):
        they would stay in every scrape for the life of the server."""
        for label in labels:
            for family in (self.queue_depth, self.batch_size, self.batch_seconds):
                _remove(family, label)

    def forget_models(self, names: Iterable[str]) -> None:
        """Drop every series of models gone from the repository.

        Example:
            >>> m = ServeMetrics()
            >>> m.observe_request("mlp", "infer", 200, 0.01)
            >>> m.forget_models(["mlp"])
            >>> b'model="mlp"' in m.render()[0]
            False
        """
        gone = set(names)
        for key in [k for k in self._request_series if k[0] in gone]:
            del self._request_series[key]
            _remove(self.requests, *key)
            _remove(self.latency, *key)
        for name in gone:
            for result in LOAD_RESULTS:
                _remove(self.loads, name, result)
            _remove(self.evictions, name)

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
