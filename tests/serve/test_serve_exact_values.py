"""Exact values at the edges of serving: queue bounds, Retry-After, batching waits, the memory
cache's accounting, the protocol's refusals, the body limit, request ids and readiness."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from serve_helpers import GatedModel, app_client, onnx_repo, pair_config, write_config, write_onnx
from slimtorch.serve.batcher import Batcher
from slimtorch.serve.cache import ModelCache
from slimtorch.serve.errors import NotReady, Overloaded
from slimtorch.serve.metrics import ServeMetrics
from slimtorch.serve.middleware import ServeMiddleware
from slimtorch.serve.model_config import ModelConfig, TensorSpec
from slimtorch.serve.repository import Repository, State, VersionEntry


def _x() -> dict[str, np.ndarray]:
    return {"x": np.zeros((1, 2), np.float32)}


# ---------------------------------------------------------------- batcher


def test_a_queue_of_one_holds_exactly_one_waiting_request() -> None:
    async def main() -> None:
        model = GatedModel()
        model.gate.clear()
        b = Batcher("m", pair_config(max_queue_size=1), model)
        b.start()
        busy = asyncio.create_task(b.submit(_x(), 1))
        await asyncio.sleep(0.05)  # the loop took it: the queue is empty again
        waiting = [asyncio.create_task(b.submit(_x(), 1)) for _ in range(2)]
        await asyncio.sleep(0.05)
        assert b.depth == 1
        model.gate.set()
        results = await asyncio.gather(busy, *waiting, return_exceptions=True)
        assert sum(isinstance(r, Overloaded) for r in results) == 1
        await b.close()

    asyncio.run(main())


@pytest.mark.parametrize(("instances", "expected"), [(1, 3), (2, 2)])
def test_retry_after_is_the_time_to_drain_the_queue(instances: int, expected: int) -> None:
    b = Batcher("m", pair_config(max_batch_size=2, instances=instances), GatedModel())
    b._batch_s = 1.0
    b._queue.extend([None] * 4)
    # 4 waiting / 2 per batch + the running one = 3 batches of 1 s, over `instances` runners
    assert b.retry_after() == expected


def test_the_batch_time_behind_retry_after_follows_the_model() -> None:
    async def main() -> None:
        b = Batcher("m", pair_config(), GatedModel(delay=0.3))
        b.start()
        await b.submit(_x(), 1)
        # 0.8 * 0.001 (the start value) + 0.2 * (at least 0.3 s)
        assert b._batch_s >= 0.8 * 0.001 + 0.2 * 0.3
        await b.close()

    asyncio.run(main())


def test_a_request_that_waited_for_a_busy_model_is_not_held_for_the_batching_delay() -> None:
    async def main() -> None:
        model = GatedModel()
        b = Batcher("m", pair_config(max_batch_size=8, max_queue_delay_ms=500), model)
        b.start()
        model.gate.clear()
        busy = asyncio.create_task(b.submit(_x(), 1))
        await asyncio.sleep(0.05)
        b._mean_batch = 4.0  # recent load: the batching wait is on
        b._rate = 1000.0
        late = asyncio.create_task(b.submit(_x(), 1))
        await asyncio.sleep(0.6)  # longer than the 500 ms delay
        b._rate = 1000.0
        t0 = time.perf_counter()
        model.gate.set()
        await late
        # its 500 ms have passed while queued: it runs as soon as the model is free
        assert time.perf_counter() - t0 < 0.25
        await busy
        await b.close()

    asyncio.run(main())


def test_inputs_named_in_another_dict_order_share_a_batch() -> None:
    async def main() -> None:
        config = ModelConfig(
            name="m",
            format="onnx",
            inputs=(TensorSpec(name="a", dims=(2,)), TensorSpec(name="b", dims=(2,))),
            outputs=(TensorSpec(name="y", dims=(2,)),),
        )
        model = GatedModel()
        b = Batcher("m", config, model)
        b.start()
        z = np.zeros((1, 2), np.float32)
        model.gate.clear()
        busy = asyncio.create_task(b.submit({"a": z, "b": z}, 1))
        await asyncio.sleep(0.05)
        t1 = asyncio.create_task(b.submit({"a": z, "b": z}, 1))
        t2 = asyncio.create_task(b.submit({"b": z, "a": z}, 1))
        await asyncio.sleep(0.05)
        model.gate.set()
        await asyncio.gather(busy, t1, t2)
        assert model.sizes == [1, 2]
        await b.close()

    asyncio.run(main())


# ---------------------------------------------------------------- cache


class _Runner:
    device = "cpu"

    def __init__(self, nbytes: int) -> None:
        self.memory_bytes = nbytes
        self.closed = False

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": inputs["x"][:, :3]}

    def close(self) -> None:
        self.closed = True


def _version(repo: Repository, name: str) -> tuple[VersionEntry, ModelConfig]:
    entry = repo.models[name]
    assert entry.config is not None
    return entry.versions[1], entry.config


def _is(path: object, name: str) -> bool:
    return name in Path(str(path)).parts


def test_a_budget_below_one_byte_is_refused() -> None:
    with pytest.raises(ValueError, match="budget_bytes must be >= 1, got 0"):
        ModelCache(0)


def test_a_model_of_exactly_the_budget_fits() -> None:
    assert ModelCache(1000).unfit_reason(1000) is None


def test_two_concurrent_loads_cannot_both_take_the_budget(tmp_path: Path) -> None:
    repo = onnx_repo(tmp_path, ["a", "bb"])
    entered, gate = threading.Event(), threading.Event()

    def loader(path: object, config: object, device: str) -> _Runner:
        if _is(path, "a"):  # a's load is under way while bb asks
            entered.set()
            gate.wait(10)
        return _Runner(1000)

    cache = ModelCache(1500, loader=loader)
    results: dict[str, str] = {}

    def go(name: str) -> None:
        v, c = _version(repo, name)
        try:
            cache.acquire(v, c, "cpu")
            results[name] = "loaded"
        except Overloaded:
            results[name] = "Overloaded"

    ta = threading.Thread(target=go, args=("a",))
    ta.start()
    assert entered.wait(10)
    tb = threading.Thread(target=go, args=("bb",))
    tb.start()
    tb.join(10)
    gate.set()
    ta.join(10)
    assert results == {"a": "loaded", "bb": "Overloaded"}
    assert cache.used_bytes == 1000


def test_a_load_that_cannot_fit_leaves_a_busy_model_resident(tmp_path: Path) -> None:
    repo = onnx_repo(tmp_path, ["a", "bb", "ccc"], pinned=("a",))
    cache = ModelCache(2000, loader=lambda p, c, d: _Runner(1000))
    va, ca = _version(repo, "a")
    cache.release(va, cache.acquire(va, ca, "cpu", pinned=True))
    vb, cb = _version(repo, "bb")
    cache.acquire(vb, cb, "cpu")  # held: a batch is running on bb
    vc, cc = _version(repo, "ccc")
    with pytest.raises(Overloaded):
        cache.acquire(vc, cc, "cpu")
    assert cache.resident() == [("a", 1), ("bb", 1)]
    assert vb.state is State.READY


def test_an_unloaded_runner_closes_only_after_its_last_batch(tmp_path: Path) -> None:
    repo = onnx_repo(tmp_path, ["a"])
    cache = ModelCache(5000, loader=lambda p, c, d: _Runner(1000))
    v, c = _version(repo, "a")
    r1 = cache.acquire(v, c, "cpu")
    r2 = cache.acquire(v, c, "cpu")
    assert r1 is r2
    cache.unload(("a", 1))
    cache.release(v, r1)
    assert not r2.closed
    assert cache.used_bytes == 1000
    cache.release(v, r2)
    assert r2.closed
    assert cache.used_bytes == 0


def test_a_version_whose_load_failed_is_not_reloaded_on_every_request(tmp_path: Path) -> None:
    repo = onnx_repo(tmp_path, ["a"])
    calls: list[int] = []

    def loader(path: object, config: object, device: str) -> _Runner:
        calls.append(1)
        raise ValueError("corrupt model")

    cache = ModelCache(5000, loader=loader)
    v, c = _version(repo, "a")
    for _ in range(3):
        with pytest.raises(NotReady, match="ValueError: corrupt model"):
            cache.acquire(v, c, "cpu")
    assert len(calls) == 1


def test_a_failed_load_gives_back_its_reserved_bytes(tmp_path: Path) -> None:
    repo = onnx_repo(tmp_path, ["a", "bb"])

    def loader(path: object, config: object, device: str) -> _Runner:
        if _is(path, "bb"):
            raise ValueError("corrupt model")
        return _Runner(1000)

    cache = ModelCache(1500, loader=loader)
    vb, cb = _version(repo, "bb")
    with pytest.raises(NotReady, match="ValueError: corrupt model"):
        cache.acquire(vb, cb, "cpu")
    assert cache.used_bytes == 0
    va, ca = _version(repo, "a")
    cache.release(va, cache.acquire(va, ca, "cpu"))  # 1000 of 1500 bytes: fits
    assert cache.used_bytes == 1000


def test_out_of_memory_while_loading_keeps_a_pinned_model(tmp_path: Path) -> None:
    repo = onnx_repo(tmp_path, ["a", "bb"], pinned=("a",))
    left = [1]

    def loader(path: object, config: object, device: str) -> _Runner:
        if _is(path, "bb") and left[0]:
            left[0] -= 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return _Runner(1000)

    cache = ModelCache(10000, loader=loader)
    va, ca = _version(repo, "a")
    cache.release(va, cache.acquire(va, ca, "cpu", pinned=True))
    vb, cb = _version(repo, "bb")
    cache.release(vb, cache.acquire(vb, cb, "cpu"))  # retried once after the eviction
    assert cache.resident() == [("a", 1), ("bb", 1)]


# ---------------------------------------------------------------- protocol over HTTP


def _write_sum_onnx(path: Path) -> None:
    """``y = a + b`` for inputs of two values each."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        "sum",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 2]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


W2 = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[Any]:
    # m: y = x @ W2 (x of two values); ab: y = a + b
    write_config(
        tmp_path / "m",
        format="onnx",
        inputs=[{"name": "x", "dims": [2]}],
        outputs=[{"name": "y", "dims": [2]}],
    )
    write_onnx(tmp_path / "m" / "1" / "model.onnx", W2, np.zeros(2, np.float32))
    write_config(
        tmp_path / "ab",
        format="onnx",
        inputs=[{"name": "a", "dims": [2]}, {"name": "b", "dims": [2]}],
        outputs=[{"name": "y", "dims": [2]}],
    )
    _write_sum_onnx(tmp_path / "ab" / "1" / "model.onnx")
    with app_client(tmp_path) as c:
        yield c


def _binary(c: Any, size: int, payload: bytes) -> Any:
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [1, 2],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": size},
                }
            ]
        }
    ).encode()
    return c.post(
        "/v2/models/m/infer",
        content=head + payload,
        headers={
            "Inference-Header-Content-Length": str(len(head)),
            "Content-Type": "application/octet-stream",
        },
    )


def _refused(r: Any, fragment: str) -> None:
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"]


def _t(name: str, shape: list[int], data: list[float]) -> dict[str, object]:
    return {"name": name, "shape": shape, "datatype": "FP32", "data": data}


def test_binary_size_must_match_the_shape_exactly(client: Any) -> None:
    # FP32 [1, 2] is 8 bytes, not 9
    _refused(_binary(client, 9, b"\0" * 9), "binary_data_size is 9 bytes but shape [1, 2]")


def test_binary_part_shorter_than_the_size_is_refused(client: Any) -> None:
    _refused(_binary(client, 8, b"\0" * 7), "needs 8 bytes of binary data at offset 0")


def test_left_over_binary_bytes_are_refused(client: Any) -> None:
    _refused(_binary(client, 8, b"\0" * 12), "binary part has 12 bytes but the inputs use 8")


def test_an_input_given_twice_is_refused(client: Any) -> None:
    body = {"inputs": [_t("x", [1, 2], [1, 2]), _t("x", [1, 2], [3, 4])]}
    _refused(client.post("/v2/models/m/infer", json=body), "'x' is given twice")


def test_an_extra_dimension_is_refused(client: Any) -> None:
    body = {"inputs": [_t("x", [1, 2, 1], [1, 2])]}
    _refused(client.post("/v2/models/m/infer", json=body), "must have shape [-1, 2]")


def test_inputs_with_different_batch_sizes_are_refused(client: Any) -> None:
    body = {"inputs": [_t("a", [1, 2], [1, 2]), _t("b", [2, 2], [1, 2, 3, 4])]}
    _refused(client.post("/v2/models/ab/infer", json=body), "same first dimension")


def test_an_empty_batch_is_refused(client: Any) -> None:
    body = {"inputs": [_t("x", [0, 2], [])]}
    _refused(client.post("/v2/models/m/infer", json=body), "must be >= 1, got 0")


def test_an_unknown_requested_output_is_refused(client: Any) -> None:
    body = {"inputs": [_t("x", [1, 2], [1, 2])], "outputs": [{"name": "z"}]}
    _refused(client.post("/v2/models/m/infer", json=body), "['z'] are not outputs")


def test_an_unknown_requested_output_is_refused_before_the_model_runs() -> None:
    from slimtorch.serve.errors import BadRequest
    from slimtorch.serve.protocol.codec import DecodedRequest, check_inputs

    x = np.ones((1, 2), np.float32)
    req = DecodedRequest(None, {"x": x}, {"x": "FP32"}, outputs={"z": False}, binary_default=False)
    with pytest.raises(BadRequest, match=r"\['z'\] are not outputs"):
        check_inputs(req, pair_config())
    req.outputs = {"y": True}
    assert check_inputs(req, pair_config()) == 1


def test_binary_data_output_applies_to_all_outputs_when_none_are_listed(client: Any) -> None:
    body = {"inputs": [_t("x", [1, 2], [1, 2])], "parameters": {"binary_data_output": True}}
    r = client.post("/v2/models/m/infer", json=body)
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    out = json.loads(r.content[:n])["outputs"][0]
    assert "data" not in out and out["parameters"]["binary_data_size"] == 4 * 1 * 2
    # [1, 2] @ [[1, 2], [3, 4]] = [7, 10]
    np.testing.assert_array_equal(np.frombuffer(r.content[n:], "<f4"), [7.0, 10.0])


# ---------------------------------------------------------------- middleware and readiness


def test_a_chunked_body_one_byte_over_the_limit_is_refused() -> None:
    app = FastAPI()

    @app.post("/size")
    async def size(request: Request) -> int:
        return len(await request.body())

    app.add_middleware(ServeMiddleware, metrics=ServeMetrics(), max_bytes=1000)

    def body(n: int) -> Iterator[bytes]:
        yield b"x" * n  # no Content-Length: the limit is counted while reading

    c = TestClient(app)
    assert c.post("/size", content=body(1000)).json() == 1000
    assert c.post("/size", content=body(1001)).status_code == 413


@pytest.mark.parametrize("rid", ["a" * 200, "evil id=1 status=200"])
def test_an_unsafe_client_request_id_is_replaced(client: Any, rid: str) -> None:
    r = client.get("/v2/health/live", headers={"X-Request-ID": rid})
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])


def test_a_stopping_server_is_not_ready_and_refuses_inference(client: Any) -> None:
    server = client.app.state.server
    server.ready = False  # what ModelServer.stop() sets first
    try:
        assert client.get("/v2/health/ready").status_code == 503
        assert client.get("/v2/models/m/ready").status_code == 503
        r = client.post("/v2/models/m/infer", json={"inputs": [_t("x", [1, 2], [1, 2])]})
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1"
    finally:
        server.ready = True
