"""Adaptive dynamic batching of one model version's requests.

Requests wait in a bounded queue. When an execution slot is free the batcher takes every
compatible request already queued (same per-item shapes), up to ``max_batch_size`` items, and
runs them as one batch in the model's own thread pool, so the event loop stays free and one
model's slow batch never holds up another model. While a batch runs, new requests queue up
and form the next batch: under load batches grow by themselves, and a lone request on an idle
server runs at once. The batcher waits up to ``max_queue_delay_ms`` for a batch to fill only
when recent batches held several requests and arrivals are frequent enough to add one within
the delay. Each request has its own future: results go back to the right requests, in order.

A batch the model fails on (:class:`~slimtorch.serve.errors.InputFailed`) is run again one
request at a time, so a client's bad input fails that client's request only. Every output must
keep the batch dimension first with one row per input row; a model whose outputs do not fails
its requests with :class:`~slimtorch.serve.errors.ModelFault` (500) rather than hand a client
another client's rows.

Past ``max_queue_size`` waiting requests, :meth:`Batcher.submit` raises
:class:`~slimtorch.serve.errors.Overloaded` (503 with Retry-After) at once.

Example (three requests queued together run as one batch of 3 rows; each gets its own rows):
    >>> import asyncio
    >>> from slimtorch.serve.model_config import TensorSpec
    >>> spec = TensorSpec(name="x", dims=(2,))
    >>> config = ModelConfig(name="double", format="onnx", inputs=(spec,),
    ...                      outputs=(TensorSpec(name="y", dims=(2,)),))
    >>> batches = []
    >>> def double(inputs):
    ...     batches.append(len(inputs["x"]))
    ...     return {"y": inputs["x"] * 2}
    >>> async def main():
    ...     batcher = Batcher("double", config, double)
    ...     batcher.start()
    ...     requests = [{"x": np.full((1, 2), i, np.float32)} for i in range(3)]
    ...     outputs = await asyncio.gather(*(batcher.submit(r, rows=1) for r in requests))
    ...     await batcher.close()
    ...     return [o["y"].tolist() for o in outputs]
    >>> asyncio.run(main())
    [[[0.0, 0.0]], [[2.0, 2.0]], [[4.0, 4.0]]]
    >>> batches
    [3]
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from slimtorch.serve.errors import InputFailed, ModelFault, NotReady, Overloaded
from slimtorch.serve.logs import request_id
from slimtorch.serve.metrics import ServeMetrics
from slimtorch.serve.model_config import ModelConfig

logger = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
Execute = Callable[[Arrays], Arrays]


@dataclasses.dataclass(eq=False)
class _Pending:
    inputs: Arrays
    rows: int
    sig: tuple[tuple[str, tuple[int, ...]], ...]
    future: asyncio.Future[Arrays]
    enqueued: float
    request_id: str  # for the logs written while the batch runs


class Batcher:
    """Queue, batch and run the requests of one model version.

    Args:
        label: Name used in metrics and logs.
        config: The model's config (batch size, delay, queue bound, instances).
        execute: Runs one batch (blocking; called in the batcher's thread pool).
        metrics: Where to report queue depth and batch sizes (optional).
    """

    def __init__(
        self,
        label: str,
        config: ModelConfig,
        execute: Execute,
        metrics: ServeMetrics | None = None,
    ) -> None:
        self.label = label
        self.config = config
        self.execute = execute
        self.metrics = metrics
        self._queue: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(config.instances)
        self._executor = ThreadPoolExecutor(
            max_workers=config.instances, thread_name_prefix=f"serve-{label}"
        )
        self._running: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._last_arrival = 0.0
        self._rate = 0.0  # arrivals per second, exponentially weighted
        self._mean_batch = 1.0  # requests per batch, exponentially weighted
        self._batch_s = 0.001  # seconds per batch, exponentially weighted
        self._metric_children: tuple[Any, Any, Any] | None = None
        if metrics is not None:
            self._metric_children = (
                metrics.queue_depth.labels(model=label),
                metrics.batch_size.labels(model=label),
                metrics.batch_seconds.labels(model=label),
            )

    @property
    def depth(self) -> int:
        """Requests waiting in the queue."""
        return len(self._queue)

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        if self._task is None:  # in a context of its own, not the starting request's
            self._task = asyncio.get_running_loop().create_task(
                self._loop(), context=contextvars.Context()
            )

    def retry_after(self) -> int:
        """Seconds a rejected client should wait: the time to drain the queue, at least 1."""
        batches = len(self._queue) / self.config.max_batch_size + 1
        return max(1, math.ceil(batches * self._batch_s / self.config.instances))

    def _gauge(self) -> None:
        if self._metric_children is not None:
            self._metric_children[0].set(len(self._queue))

    async def submit(self, inputs: Arrays, rows: int) -> Arrays:
        """Queue one request (``rows`` items, batch first) and wait for its outputs.

        Raises:
            Overloaded: The queue is full.
            NotReady: The server is shutting down.
        """
        if self._closing:
            raise NotReady(f"model {self.label!r} is shutting down; retry on another server")
        if len(self._queue) >= self.config.max_queue_size:
            raise Overloaded(
                f"the queue of model {self.label!r} is full ({self.config.max_queue_size} "
                "requests waiting); retry later",
                retry_after=self.retry_after(),
            )
        now = time.perf_counter()
        gap = now - self._last_arrival if self._last_arrival else 1.0
        self._last_arrival = now
        self._rate = 0.8 * self._rate + 0.2 / max(gap, 1e-6)
        sig = tuple(sorted((name, a.shape[1:]) for name, a in inputs.items()))
        future: asyncio.Future[Arrays] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(inputs, rows, sig, future, now, request_id.get()))
        self._wakeup.set()
        self._gauge()
        return await future

    def _take(self, batch: list[_Pending], rows: int) -> int:
        limit = self.config.max_batch_size
        while self._queue:
            head = self._queue[0]
            if head.future.done():  # cancelled (timed out) while waiting
                self._queue.popleft()
                continue
            if batch and (head.sig != batch[0].sig or rows + head.rows > limit):
                break
            batch.append(self._queue.popleft())
            rows += head.rows
        return rows

    def _expect_more(self) -> bool:
        delay = self.config.max_queue_delay_ms / 1000
        return delay > 0 and self._mean_batch > 1.5 and self._rate * delay >= 1.0

    async def _loop(self) -> None:
        limit = self.config.max_batch_size
        while True:
            while not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._slots.acquire()
            batch: list[_Pending] = []
            rows = self._take(batch, 0)
            if batch and rows < limit and self._expect_more():
                deadline = batch[0].enqueued + self.config.max_queue_delay_ms / 1000
                while rows < limit and (left := deadline - time.perf_counter()) > 0:
                    if self._queue and (
                        self._queue[0].sig != batch[0].sig or rows + self._queue[0].rows > limit
                    ):
                        break
                    self._wakeup.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), left)
                    rows = self._take(batch, rows)
            self._gauge()
            if not batch:
                self._slots.release()
                continue
            self._mean_batch = 0.8 * self._mean_batch + 0.2 * len(batch)
            task = asyncio.get_running_loop().create_task(self._run(batch, rows))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _call(self, ids: str, inputs: Arrays, rows: int) -> tuple[Arrays, float]:
        # the pool's threads do not run in the requests' context: the logs written here (a
        # model loaded on demand, an eviction) name the batch's requests
        token = request_id.set(ids)
        try:
            return self._call_model(inputs, rows)
        finally:
            request_id.reset(token)

    def _call_model(self, inputs: Arrays, rows: int) -> tuple[Arrays, float]:
        start = time.perf_counter()
        out = self.execute(inputs)
        seconds = time.perf_counter() - start
        for name, value in out.items():
            if value.ndim == 0 or value.shape[0] != rows:
                raise ModelFault(
                    f"model {self.label!r} returned output {name!r} of shape "
                    f"{list(value.shape)} for a batch of {rows}; a served model's outputs must "
                    "keep the batch dimension first, one row per input row"
                )
        return out, seconds

    async def _run(self, batch: list[_Pending], rows: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            if len(batch) == 1:
                merged = batch[0].inputs
            else:
                merged = {
                    name: np.concatenate([p.inputs[name] for p in batch])
                    for name in batch[0].inputs
                }
            try:
                ids = ",".join(dict.fromkeys(p.request_id for p in batch))
                outputs, seconds = await loop.run_in_executor(
                    self._executor, self._call, ids, merged, rows
                )
            except InputFailed:
                if len(batch) == 1:
                    raise
                await self._run_alone(batch)
                return
            self._record(rows, seconds)
            offset = 0
            for p in batch:
                if not p.future.done():
                    p.future.set_result(
                        {k: v[offset : offset + p.rows] for k, v in outputs.items()}
                    )
                offset += p.rows
        except Exception as exc:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
        finally:
            self._slots.release()

    def _record(self, rows: int, seconds: float) -> None:
        """Count a batch that ran in the metrics and in the batch time behind Retry-After."""
        self._batch_s = 0.8 * self._batch_s + 0.2 * seconds
        if self._metric_children is not None:
            self._metric_children[1].observe(rows)
            self._metric_children[2].observe(seconds)

    async def _run_alone(self, batch: list[_Pending]) -> None:
        """Run each request of a batch that failed on its own, so that only the requests the
        model cannot run fail (:class:`~slimtorch.serve.errors.InputFailed`)."""
        loop = asyncio.get_running_loop()
        token = request_id.set(",".join(dict.fromkeys(p.request_id for p in batch)))
        logger.info(
            "a batch of %d requests to %s failed; running them one by one", len(batch), self.label
        )
        request_id.reset(token)
        for p in batch:
            if p.future.done():
                continue
            try:
                outputs, seconds = await loop.run_in_executor(
                    self._executor, self._call, p.request_id, p.inputs, p.rows
                )
            except Exception as exc:
                if not p.future.done():
                    p.future.set_exception(exc)
            else:
                self._record(p.rows, seconds)  # a batch of its own
                if not p.future.done():
                    p.future.set_result(outputs)

    async def close(self) -> None:
        """Stop taking requests, finish the queued and running ones, stop the thread pool."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)
