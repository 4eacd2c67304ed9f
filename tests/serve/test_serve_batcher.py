"""Dynamic batching: batches form under load, lone requests run at once, bounded queue."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from serve_helpers import GatedModel, logged_request_ids, pair_config
from slimtorch.serve.batcher import Batcher
from slimtorch.serve.errors import InputFailed, Overloaded
from slimtorch.serve.metrics import ServeMetrics
from slimtorch.serve.model_config import ModelConfig, TensorSpec


def _x(i: float, rows: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.full((rows, 2), i, np.float32)}


def test_lone_request_runs_at_once_and_concurrent_ones_batch_in_order() -> None:
    async def main() -> None:
        model = GatedModel()
        b = Batcher("m", pair_config(max_batch_size=8, max_queue_delay_ms=500), model)
        b.start()
        t0 = time.perf_counter()
        out = await b.submit(_x(1), 1)
        assert time.perf_counter() - t0 < 0.25  # no 500 ms batching wait when idle
        np.testing.assert_array_equal(out["y"], np.full((1, 2), 2, np.float32))
        model.gate.clear()  # hold the model busy: the next requests queue up
        first = asyncio.create_task(b.submit(_x(0), 1))
        await asyncio.sleep(0.05)
        rest = [
            asyncio.create_task(b.submit(_x(i, rows=1 + i % 2), 1 + i % 2)) for i in range(1, 6)
        ]
        await asyncio.sleep(0.05)
        model.gate.set()
        await first
        outs = await asyncio.gather(*rest)
        for i, o in enumerate(outs, start=1):  # each request gets its own rows back
            np.testing.assert_array_equal(o["y"], np.full((1 + i % 2, 2), 2 * i, np.float32))
        assert model.sizes == [1, 1, 8]  # the five queued requests (8 rows) ran as one batch
        await b.close()

    asyncio.run(main())


def test_full_queue_is_refused_with_retry_after_and_nothing_is_lost() -> None:
    async def main() -> None:
        model = GatedModel()
        b = Batcher("m", pair_config(max_batch_size=2, max_queue_size=4), model)
        b.start()
        model.gate.clear()
        tasks = [asyncio.create_task(b.submit(_x(i), 1)) for i in range(12)]
        await asyncio.sleep(0.05)
        model.gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        ok = [r for r in results if isinstance(r, dict)]
        refused = [r for r in results if isinstance(r, Overloaded)]
        assert len(ok) + len(refused) == 12 and len(refused) >= 6
        assert all(r.retry_after is not None and r.retry_after >= 1 for r in refused)
        assert sum(model.sizes) == len(ok)
        await b.close()

    asyncio.run(main())


def test_slow_model_does_not_stall_another() -> None:
    async def main() -> None:
        slow, fast = GatedModel(), GatedModel()
        slow.gate.clear()
        bs = Batcher("slow", pair_config(), slow)
        bf = Batcher("fast", pair_config(), fast)
        bs.start()
        bf.start()
        stuck = asyncio.create_task(bs.submit(_x(1), 1))
        await asyncio.sleep(0.02)
        t0 = time.perf_counter()
        for i in range(5):
            await bf.submit(_x(i), 1)
        assert time.perf_counter() - t0 < 1.0 and not stuck.done()
        slow.gate.set()
        await stuck
        await bs.close()
        await bf.close()

    asyncio.run(main())


def test_close_finishes_accepted_requests_and_errors_reach_every_request() -> None:
    async def main() -> None:
        model = GatedModel(delay=0.01)
        b = Batcher("m", pair_config(max_batch_size=2), model)
        b.start()
        tasks = [asyncio.create_task(b.submit(_x(i), 1)) for i in range(6)]
        await asyncio.sleep(0)
        await b.close()
        assert all(t.done() and not t.exception() for t in tasks)
        with pytest.raises(Exception, match="shutting down"):
            await b.submit(_x(0), 1)

        def broken(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            raise RuntimeError("kernel failed")

        bb = Batcher("b", pair_config(), broken)
        bb.start()
        results = await asyncio.gather(
            *(bb.submit(_x(i), 1) for i in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, RuntimeError) for r in results)
        await bb.close()

    asyncio.run(main())


def test_requests_rerun_one_by_one_count_in_the_batch_metrics() -> None:
    # the runs of a failed batch's requests on their own used to be left out of the
    # batch_size / batch_duration histograms and of the batch time behind Retry-After
    gate = threading.Event()

    def picky(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        gate.wait(10)
        if (inputs["x"] == 99).any():
            raise InputFailed("model 'm' could not run on this input")
        return {"y": inputs["x"] * 2}

    async def main() -> list[object]:
        b = Batcher("m", pair_config(max_batch_size=8), picky, metrics)
        b.start()
        first = asyncio.create_task(b.submit(_x(0), 1))  # runs alone, holds the model
        await asyncio.sleep(0.2)
        values = [1, 99, 2, 3]
        rest = [
            asyncio.create_task(b.submit(_x(v, rows=1 + i % 2), 1 + i % 2))
            for i, v in enumerate(values)
        ]
        await asyncio.sleep(0.2)
        gate.set()  # the four queued requests (6 rows) fail as a batch, then run one by one
        await first
        results = await asyncio.gather(*rest, return_exceptions=True)
        await b.close()
        return results

    metrics = ServeMetrics()
    results = asyncio.run(main())
    assert [isinstance(r, InputFailed) for r in results] == [False, True, False, False]

    def sample(name: str) -> float | None:
        return metrics.registry.get_sample_value(f"slimtorch_serve_{name}", {"model": "m"})

    # the first request, then the three requests that ran on their own (1, 1 and 2 rows)
    assert sample("batch_size_count") == 4 and sample("batch_size_sum") == 5
    assert sample("batch_duration_seconds_count") == 4


def test_cancelled_request_is_skipped() -> None:
    async def main() -> None:
        model = GatedModel()
        b = Batcher("m", pair_config(), model)
        b.start()
        model.gate.clear()
        first = asyncio.create_task(b.submit(_x(0), 1))
        await asyncio.sleep(0.02)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(b.submit(_x(1), 1), 0.02)
        model.gate.set()
        await first
        await b.submit(_x(2), 1)
        assert sum(model.sizes) == 2  # the timed-out request never ran
        await b.close()

    asyncio.run(main())


def test_requests_naming_inputs_in_another_order_batch_by_name() -> None:
    # per-item shapes (2,), (3,) in one request and (3,), (2,) in the other, in the other order:
    # the same shapes position by position, but not name by name
    config = ModelConfig(
        name="m",
        format="onnx",
        inputs=(TensorSpec(name="a", dims=(-1,)), TensorSpec(name="b", dims=(-1,))),
        outputs=(TensorSpec(name="y", dims=(-1,)),),
    )
    gate = threading.Event()
    sizes: list[int] = []

    def joined(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        gate.wait(10)
        sizes.append(len(inputs["a"]))
        return {"y": np.concatenate([inputs["a"], inputs["b"]], axis=1)}

    async def main() -> None:
        b = Batcher("m", config, joined)
        b.start()
        busy = asyncio.create_task(b.submit({"a": np.zeros((1, 1)), "b": np.zeros((1, 1))}, 1))
        await asyncio.sleep(0.05)
        one = asyncio.create_task(
            b.submit({"a": np.full((1, 2), 1.0), "b": np.full((1, 3), 2.0)}, 1)
        )
        two = asyncio.create_task(
            b.submit({"b": np.full((1, 2), 3.0), "a": np.full((1, 3), 4.0)}, 1)
        )
        await asyncio.sleep(0.05)
        gate.set()
        await busy
        np.testing.assert_array_equal((await one)["y"], [[1, 1, 2, 2, 2]])
        np.testing.assert_array_equal((await two)["y"], [[4, 4, 4, 3, 3]])
        assert sizes == [1, 1, 1]  # not batched together
        await b.close()

    asyncio.run(main())


def test_logs_of_a_batch_name_its_requests_not_the_one_that_started_the_batcher() -> None:
    import logging

    from slimtorch.serve.errors import InputFailed
    from slimtorch.serve.logs import request_id

    config = ModelConfig(
        name="m",
        format="onnx",
        inputs=(TensorSpec(name="x", dims=(2,)),),
        outputs=(TensorSpec(name="y", dims=(2,)),),
    )
    gate = threading.Event()

    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        gate.wait(10)
        logging.getLogger("slimtorch.serve.model").info("ran %d", len(inputs["x"]))
        if len(inputs["x"]) > 1:
            raise InputFailed("this batch fails")  # then each request runs alone
        return {"y": inputs["x"]}

    async def send(b: Batcher, rid: str) -> object:
        request_id.set(rid)
        return await b.submit({"x": np.zeros((1, 2), np.float32)}, 1)

    async def main() -> None:
        request_id.set("load-1")  # a management request starts the batcher
        b = Batcher("m", config, run)
        b.start()
        request_id.set("-")
        busy = asyncio.create_task(send(b, "first"))
        await asyncio.sleep(0.05)
        both = [asyncio.create_task(send(b, rid)) for rid in ("a", "b")]  # queue up: one batch
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(busy, *both)
        await b.close()

    with logged_request_ids() as seen:
        asyncio.run(main())
    assert ("ran 1", "first") in seen and ("ran 2", "a,b") in seen
    failed = [rid for msg, rid in seen if msg.startswith("a batch of 2 requests")]
    assert failed == ["a,b"] and "load-1" not in {rid for _, rid in seen}
