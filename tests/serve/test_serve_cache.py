"""The memory-bounded cache: LRU eviction, pinning, busy models, out-of-memory retry."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from serve_helpers import onnx_repo, write_config, write_onnx
from slimtorch.serve.cache import ModelCache
from slimtorch.serve.errors import NotReady, Overloaded
from slimtorch.serve.metrics import ServeMetrics
from slimtorch.serve.model_config import ModelConfig
from slimtorch.serve.repository import Repository, State
from slimtorch.serve.runners import Runner, load_runner
from slimtorch.serve.server import ModelServer
from slimtorch.serve.settings import ServeSettings

W = np.eye(4, 3, dtype=np.float32)
B = np.zeros(3, np.float32)


def _use(cache: ModelCache, repo: Repository, name: str) -> np.ndarray:
    entry = repo.models[name]
    assert entry.config is not None
    with cache.use(entry.versions[1], entry.config, "cpu", pinned=entry.config.pinned) as runner:
        return runner.run({"x": np.ones((1, 4), np.float32)})["y"]


def test_least_recently_used_is_evicted(tmp_path: Path) -> None:
    repo = onnx_repo(tmp_path, ["a", "bb", "ccc"], memory=1000)
    metrics = ServeMetrics()
    cache = ModelCache(2500, metrics)
    _use(cache, repo, "a")
    _use(cache, repo, "bb")
    _use(cache, repo, "a")  # "bb" is now the least recently used
    out = _use(cache, repo, "ccc")
    np.testing.assert_allclose(out, np.ones((1, 4), np.float32) @ (W * 4))
    assert cache.resident() == [("a", 1), ("ccc", 1)]
    assert repo.models["bb"].versions[1].state is State.AVAILABLE
    assert repo.models["ccc"].versions[1].state is State.READY
    assert cache.used_bytes == 2000
    text = metrics.render()[0].decode()
    assert 'slimtorch_serve_model_evictions_total{model="bb"} 1.0' in text
    _use(cache, repo, "bb")  # loads again on demand
    assert ("bb", 1) in cache.resident()


def test_loading_keeps_no_lock_per_version_ever_loaded(tmp_path: Path) -> None:
    # a lock was kept for every (model, version) loaded since the server started
    repo = onnx_repo(tmp_path, ["a", "bb", "ccc"], memory=1000)
    cache = ModelCache(1500, None)  # one resident at a time: every use loads
    for name in ["a", "bb", "ccc", "a", "bb"]:
        _use(cache, repo, name)
    assert len(cache._load_locks) == 0


def test_pinned_and_busy_models_stay(tmp_path: Path) -> None:
    repo = onnx_repo(tmp_path, ["a", "bb", "ccc"], memory=1000, pinned=("a",))
    assert repo.models["a"].config is not None and repo.models["a"].config.pinned
    cache = ModelCache(2000)
    _use(cache, repo, "a")
    e = repo.models["bb"]
    assert e.config is not None
    runner = cache.acquire(e.versions[1], e.config, "cpu")  # held busy
    with pytest.raises(Overloaded, match="pinned or busy") as info:
        _use(cache, repo, "ccc")
    assert info.value.retry_after == 1
    cache.release(e.versions[1], runner)
    _use(cache, repo, "ccc")  # now "bb" is idle and is evicted
    assert cache.resident() == [("a", 1), ("ccc", 1)]
    assert runner is not None


def test_a_load_that_cannot_fit_evicts_nothing(tmp_path: Path) -> None:
    # the idle models were evicted first, and then the load failed anyway
    repo = onnx_repo(tmp_path, ["a", "bb"], memory=1000, pinned=("a",))
    write_config(
        tmp_path / "huge",
        format="onnx",
        memory_bytes=2500,
        inputs=[{"name": "x", "dims": [4]}],
        outputs=[{"name": "y", "dims": [3]}],
    )
    write_onnx(tmp_path / "huge" / "1" / "model.onnx", W, B)
    repo.scan()
    metrics = ServeMetrics()
    cache = ModelCache(3000, metrics)
    _use(cache, repo, "a")
    _use(cache, repo, "bb")
    for _ in range(2):
        with pytest.raises(Overloaded, match="pinned or busy") as info:
            _use(cache, repo, "huge")
        assert info.value.retry_after == 1
        assert cache.resident() == [("a", 1), ("bb", 1)]
    assert "slimtorch_serve_model_evictions_total{" not in metrics.render()[0].decode()
    assert repo.models["bb"].versions[1].state is State.READY


def test_model_larger_than_budget_is_not_ready(tmp_path: Path) -> None:
    repo = onnx_repo(tmp_path, ["a"], memory=10_000)
    cache = ModelCache(5000)
    with pytest.raises(NotReady, match="memory budget"):
        _use(cache, repo, "a")
    assert repo.models["a"].versions[1].state is State.UNAVAILABLE


def test_out_of_memory_while_loading_evicts_and_retries_once(tmp_path: Path) -> None:
    repo = onnx_repo(tmp_path, ["a", "bb"], memory=100)
    failures = {"left": 1}

    def loader(path: Path, config: ModelConfig, device: str) -> Runner:
        if config.name == "bb" and failures["left"] > 0:
            failures["left"] -= 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return load_runner(path, config, device)

    cache = ModelCache(10_000, loader=loader)
    _use(cache, repo, "a")
    _use(cache, repo, "bb")  # first try fails, idle "a" is evicted, second try loads
    assert cache.resident() == [("bb", 1)]
    failures["left"] = 2
    cache.unload(("bb", 1))
    with pytest.raises(Overloaded, match="out of device memory"):
        _use(cache, repo, "bb")
    assert repo.models["bb"].versions[1].state is State.AVAILABLE  # not broken: retry later


def test_corrupt_onnx_is_reported(tmp_path: Path) -> None:
    repo = onnx_repo(tmp_path, ["a"], memory=100)
    (tmp_path / "a" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    cache = ModelCache(10_000)
    with pytest.raises(NotReady, match="ONNX Runtime cannot load"):
        _use(cache, repo, "a")
    ver = repo.models["a"].versions[1]
    assert ver.state is State.UNAVAILABLE and "ONNX" in ver.reason
    shutil.rmtree(tmp_path / "a" / "1")
    repo.scan()
    assert "no numbered version" in repo.models["a"].error


def test_a_simulated_int8_directory_is_served_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from slimtorch.models import create_model, save_model
    from slimtorch.quant import PTQConfig, quantize_
    from slimtorch.serve.model_config import TensorSpec

    model = create_model("lenet5", in_channels=1, input_size=28).eval()
    calib = [torch.randn(4, 1, 28, 28)]
    config = ModelConfig(
        name="lenet-int8",
        format="slimtorch",
        inputs=(TensorSpec(name="input", dims=(1, 28, 28)),),
        outputs=(TensorSpec(name="logits", dims=(10,)),),
    )
    for name, quantize in (("float", False), ("int8", True)):
        if quantize:
            quantize_(model, PTQConfig(mode="static"), calibration=calib)
        folder = save_model(
            model,
            tmp_path / name / "1",
            input_shape=(1, 28, 28),
            mean=[0.5],
            std=[0.5],
            class_names=[str(i) for i in range(10)],
        )
        caplog.clear()
        with caplog.at_level("WARNING", logger="slimtorch.serve.runners"):
            runner = load_runner(folder, config, "cpu")
        runner.close()
        warned = [r for r in caplog.records if "simulated in float" in r.getMessage()]
        assert len(warned) == int(quantize)
    assert "lenet-int8" in warned[0].getMessage() and "--format onnx" in warned[0].getMessage()


def test_unload_while_a_batch_runs_keeps_its_runner_until_released(tmp_path: Path) -> None:
    repo = onnx_repo(tmp_path, ["a", "bb", "ccc"], memory=1000)
    cache = ModelCache(2500)
    e = repo.models["a"]
    assert e.config is not None
    x = {"x": np.ones((1, 4), np.float32)}
    running = cache.acquire(e.versions[1], e.config, "cpu")  # a batch took the runner ...
    assert cache.unload(("a", 1))  # ... and the management API unloads the model meanwhile
    assert cache.resident() == [] and cache.used_bytes == 1000  # still held by the batch
    np.testing.assert_allclose(running.run(x)["y"], x["x"] @ (W * 2))
    _use(cache, repo, "a")  # loaded again while the first batch still runs
    assert cache.used_bytes == 2000
    cache.release(e.versions[1], running)  # the first batch ends: its runner is closed
    assert cache.used_bytes == 1000 and cache.resident() == [("a", 1)]
    _use(cache, repo, "bb")
    _use(cache, repo, "ccc")  # "a" is idle and least recently used: evicted for "ccc"
    assert cache.resident() == [("bb", 1), ("ccc", 1)]


def test_unload_during_a_load_is_not_undone_by_the_load(tmp_path: Path) -> None:
    onnx_repo(tmp_path, ["a"], memory=100)
    started, go = threading.Event(), threading.Event()

    def slow_loader(path: Path, config: ModelConfig, device: str) -> Runner:
        started.set()
        go.wait(10)
        return load_runner(path, config, device)

    async def main() -> None:
        server = ModelServer(ServeSettings(repository=str(tmp_path), device="cpu", threads=1))
        await server.start()
        assert server.cache is not None
        server.cache.loader = slow_loader
        try:
            load = asyncio.create_task(server.load("a"))
            await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
            await server.unload("a")
            go.set()
            with pytest.raises(NotReady, match="was unloaded while it was loading"):
                await load
            assert server.cache.resident() == [] and server.cache.used_bytes == 0
            ver = server.repository.models["a"].versions[1]
            assert ver.state is State.UNLOADED
        finally:
            go.set()
            await server.stop()

    asyncio.run(main())


def test_a_rescan_of_a_changed_model_keeps_a_batcher_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the rescan closed the old batcher (draining its queue) before adding the new one, and
    # requests in between got "not being served" 503s without Retry-After
    from slimtorch.serve.batcher import Batcher

    onnx_repo(tmp_path, ["a"], memory=100)
    real_close = Batcher.close

    async def slow_close(self: Batcher) -> None:
        await asyncio.sleep(0.3)  # a queue still draining
        await real_close(self)

    monkeypatch.setattr(Batcher, "close", slow_close)

    async def main() -> None:
        server = ModelServer(ServeSettings(repository=str(tmp_path), device="cpu", threads=1))
        await server.start()
        try:
            old = server.batchers[("a", 1)]
            (tmp_path / "a" / "notes.txt").write_text("changed")
            rescan = asyncio.create_task(server.rescan())
            await asyncio.sleep(0.15)  # the old batcher is closing now
            assert not rescan.done()
            assert ("a", 1) in server.batchers and server.batchers[("a", 1)] is not old
            assert await rescan == {"a"}
        finally:
            await server.stop()

    asyncio.run(main())


def test_the_server_gives_the_thread_count_back_when_it_stops(tmp_path: Path) -> None:
    # start() set torch's thread count for the process and stop() left it there
    before = torch.get_num_threads()
    want = 2 if before == 1 else 1

    async def main() -> int:
        server = ModelServer(ServeSettings(repository=str(tmp_path), device="cpu", threads=want))
        await server.start()
        running = torch.get_num_threads()
        await server.stop()
        return running

    try:
        assert asyncio.run(main()) == want
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


def test_a_changed_version_does_not_get_the_runner_of_its_old_files(tmp_path: Path) -> None:
    # a rescan installs the new version's batcher before the old runner is unloaded; looked up
    # by (name, version) only, the new batcher's requests were answered by the old model
    repo = onnx_repo(tmp_path, ["a"], memory=1000)
    cache = ModelCache(10_000)
    old = _use(cache, repo, "a")
    write_onnx(tmp_path / "a" / "1" / "model.onnx", W * 7, B)  # new weights, same version
    repo.scan()
    new = _use(cache, repo, "a")
    np.testing.assert_allclose(new, np.ones((1, 4), np.float32) @ (W * 7))
    assert not np.allclose(new, old)
    assert cache.resident() == [("a", 1)]
