"""The model server behind the HTTP layer: repository, cache, one batcher per model version.

Example (a repository of one small model; the server's methods are coroutines):
    >>> import asyncio, json, tempfile, pathlib
    >>> from slimtorch.models import create_model, save_model
    >>> from slimtorch.serve.protocol.codec import parse_request
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = save_model(create_model("mlp"), d / "mnist-mlp" / "1", input_shape=(1, 28, 28),
    ...                mean=[0.5], std=[0.5], class_names=list("0123456789"))
    >>> x = {"name": "input", "shape": [2, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 1568}
    >>> decoded_request = parse_request(json.dumps({"inputs": [x]}).encode(), None)
    >>> async def main():
    ...     server = ModelServer(ServeSettings(repository=str(d), device="cpu"))
    ...     await server.start()
    ...     entry, ver, outputs = await server.infer("mnist-mlp", None, decoded_request)
    ...     await server.stop()
    ...     return ver.version, outputs["logits"].shape
    >>> asyncio.run(main())
    (1, (2, 10))
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from slimtorch.core.devices import read_meminfo
from slimtorch.core.errors import ModelLoadError, SlimtorchError, is_out_of_memory
from slimtorch.serve.batcher import Arrays, Batcher
from slimtorch.serve.cache import ModelCache
from slimtorch.serve.errors import InputFailed, NotReady, Overloaded
from slimtorch.serve.metrics import ServeMetrics
from slimtorch.serve.model_config import ModelConfig
from slimtorch.serve.protocol.codec import DecodedRequest, check_inputs
from slimtorch.serve.repository import (
    UNLOADED_REASON,
    ModelEntry,
    Repository,
    State,
    VersionEntry,
    check_version,
)
from slimtorch.serve.runners import Runner, default_device, estimate_memory
from slimtorch.serve.settings import ServeSettings

logger = logging.getLogger(__name__)

Key = tuple[str, int]


def memory_budget(settings: ServeSettings) -> int:
    """Bytes the cache may use: the setting, else ``memory_fraction`` of the device's memory.

    The device is the server's default device: total GPU memory for CUDA/ROCm, ``MemTotal``
    for the CPU (8 GiB where unknown).

    Example:
        >>> memory_budget(ServeSettings(memory_budget_bytes=1 << 30))
        1073741824
    """
    if settings.memory_budget_bytes is not None:
        return settings.memory_budget_bytes
    try:
        dev = torch.device(default_device(settings.device))
    except ValueError:
        dev = torch.device("cpu")
    if dev.type == "cuda":
        total = torch.cuda.mem_get_info(dev)[1]
    else:
        total = read_meminfo().get("MemTotal", 8 << 30)
    return max(1, int(total * settings.memory_fraction))


def human_bytes(n: int) -> str:
    """A byte count for people: binary units with one decimal, then the exact count (the
    memory-budget flag takes bytes).

    Example:
        >>> human_bytes(20221208166), human_bytes(512)
        ('18.8 GiB (20,221,208,166 bytes)', '512 bytes')
    """
    size, unit = float(n), "bytes"
    for name in ("KiB", "MiB", "GiB", "TiB"):
        if size < 1024:
            break
        size, unit = size / 1024, name
    return f"{n:,} bytes" if unit == "bytes" else f"{size:.1f} {unit} ({n:,} bytes)"


def _failure(model: str, exc: Exception) -> str:
    """What a client is told when the model raised on its input: the error's first line."""
    lines = str(exc).strip().splitlines()
    why = lines[0][:300] if lines else ""
    return (
        f"model {model!r} could not run on this input ({type(exc).__name__}: {why}); check the "
        "input's values and shape against what the model accepts"
    )


class ModelServer:
    """Everything the endpoints need; :meth:`start` and :meth:`stop` bracket its life.

    Args:
        settings: Server settings.
        metrics: The app's metrics (a fresh set by default).
    """

    def __init__(self, settings: ServeSettings, metrics: ServeMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or ServeMetrics()
        root = Path(settings.repository) if settings.repository else None
        self.repository = Repository(root, settings)
        self.cache: ModelCache | None = None
        self.batchers: dict[Key, Batcher] = {}
        self.ready = False
        self._poll: asyncio.Task[None] | None = None
        self._scan_lock = asyncio.Lock()
        self._threads_before: int | None = None

    # -- life cycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Scan the repository, start the batchers, load pinned/start-up models."""
        if self.settings.threads is not None:
            self._threads_before = torch.get_num_threads()  # given back by stop()
            torch.set_num_threads(self.settings.threads)
        self.cache = ModelCache(memory_budget(self.settings), self.metrics)
        await self.rescan()
        unknown = [n for n in self.settings.pinned if n not in self.repository.models]
        if unknown:
            logger.warning(
                "pinned model(s) %s are not in the repository; they are pinned if they appear",
                unknown,
            )
        if self.settings.poll_interval_s > 0:
            self._poll = asyncio.get_running_loop().create_task(self._poll_loop())
        self.ready = True
        logger.info(
            "serving %d model(s); memory budget %s",
            len(self.repository.models),
            human_bytes(self.cache.budget_bytes),
        )

    async def stop(self) -> None:
        """Refuse new requests, finish the accepted ones, unload every model."""
        self.ready = False
        if self._poll is not None:
            self._poll.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll
        await asyncio.gather(*(b.close() for b in self.batchers.values()))
        self.batchers.clear()
        if self.cache is not None:
            self.cache.close()
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            try:
                await self.rescan()
            except Exception:  # a bad scan must not end polling
                logger.exception("repository re-scan failed")

    async def rescan(self) -> set[str]:
        """Re-read the repository and (re)start the batchers of models added or changed."""
        async with self._scan_lock:
            loop = asyncio.get_running_loop()
            old = dict(self.repository.models)
            changed = await loop.run_in_executor(None, self.repository.scan)
            retired = []
            for name in changed:  # no await in here: a request sees the old or the new batcher
                retired += [self.batchers.pop(k) for k in list(self.batchers) if k[0] == name]
                entry = self.repository.models.get(name)
                if entry is not None and entry.config is not None:
                    for ver in entry.versions.values():
                        self._add_batcher(entry, ver)
                        self._check_fits(entry, ver)
            await asyncio.gather(*(b.close() for b in retired))  # their queued requests run
            for name in changed:  # then the old runners go: the next request loads the new files
                if name in old and self.cache is not None:
                    for v in old[name].versions:
                        self.cache.unload((name, v))
            live = {b.label for b in self.batchers.values()}  # series of what no longer runs
            self.metrics.forget_batchers({b.label for b in retired} - live)
            self.metrics.forget_models(set(old) - set(self.repository.models))
            await self._startup_loads(changed)
            return changed

    def _device(self, config: ModelConfig) -> str:
        return default_device(config.device or self.settings.device)

    def _add_batcher(self, entry: ModelEntry, ver: VersionEntry) -> None:
        config = entry.config
        assert config is not None
        try:
            device = self._device(config)
        except ValueError as exc:
            ver.state, ver.reason = State.UNAVAILABLE, str(exc)
            return
        label = entry.name if len(entry.versions) == 1 else f"{entry.name}:{ver.version}"
        batcher = Batcher(label, config, self._executor(ver, config, device), self.metrics)
        batcher.start()
        self.batchers[(entry.name, ver.version)] = batcher

    def _check_fits(self, entry: ModelEntry, ver: VersionEntry) -> None:
        """Mark a version that can never fit the memory budget not ready, and say so."""
        assert self.cache is not None and entry.config is not None
        if not ver.servable:
            return
        try:
            unfit = self.cache.unfit_reason(estimate_memory(ver.path, entry.config))
        except OSError as exc:
            unfit = f"its files cannot be read ({exc})"
        if unfit is not None:
            ver.state, ver.reason = State.UNAVAILABLE, unfit
            logger.warning("model %s version %d is not ready: %s", entry.name, ver.version, unfit)

    async def _startup_loads(self, names: set[str]) -> None:
        """Load the versions of start-up and pinned models; one that fails is not ready."""
        for name in sorted(names):
            entry = self.repository.models.get(name)
            if entry is None or entry.config is None:
                continue
            policy = entry.config.load_policy or self.settings.load_policy
            if policy != "startup" and not entry.config.pinned:
                continue
            for ver in entry.versions.values():
                if not ver.servable:
                    continue  # already reported as not ready
                try:
                    await asyncio.to_thread(self._load_now, entry, ver)
                except (NotReady, Overloaded) as exc:
                    if ver.state in (State.AVAILABLE, State.LOADING):  # no room, or no memory
                        ver.state = State.UNAVAILABLE
                        ver.reason = (
                            f"{exc.message}; load it through the management API once there is room"
                        )
                    logger.warning(
                        "model %s version %d was not loaded at start-up and is not ready: %s",
                        name,
                        ver.version,
                        ver.reason,
                    )

    def _load_now(self, entry: ModelEntry, ver: VersionEntry) -> None:
        assert self.cache is not None and entry.config is not None
        runner = self.cache.acquire(
            ver, entry.config, self._device(entry.config), pinned=entry.config.pinned
        )
        self.cache.release(ver, runner)

    def _executor(
        self, ver: VersionEntry, config: ModelConfig, device: str
    ) -> Callable[[Arrays], Arrays]:
        cache = self.cache
        assert cache is not None

        def run(runner: Runner, inputs: Arrays) -> Arrays:
            try:
                return runner.run(inputs)
            except SlimtorchError:
                raise
            except Exception as exc:
                if is_out_of_memory(exc):
                    raise
                raise InputFailed(_failure(ver.model, exc)) from exc

        def execute(inputs: Arrays) -> Arrays:
            runner = cache.acquire(ver, config, device, pinned=config.pinned)
            try:
                try:
                    return run(runner, inputs)
                except Exception as exc:
                    if not is_out_of_memory(exc):
                        raise
                    logger.warning(
                        "out of memory running %s; evicting idle models, retrying", ver.model
                    )
                    cache.evict_idle(exclude=(ver.model, ver.version))
                try:
                    return run(runner, inputs)
                except Exception as exc:
                    if not is_out_of_memory(exc):
                        raise
                    raise Overloaded(
                        f"model {ver.model!r} ran out of device memory on a batch of "
                        f"{next(iter(inputs.values())).shape[0]} even after evicting the idle "
                        "models; retry later, or send smaller batches",
                        retry_after=1,
                    ) from None
            finally:
                cache.release(ver, runner)

        return execute

    # -- requests ---------------------------------------------------------------------------
    async def infer(
        self, name: str, version: str | None, request: DecodedRequest
    ) -> tuple[ModelEntry, VersionEntry, Arrays]:
        """Check a decoded request against the model and run it through the model's batcher.

        Raises:
            NotFound, NotReady, BadRequest, Overloaded: see :mod:`slimtorch.serve.errors`.
        """
        entry, ver = self.repository.version(name, version)
        assert entry.config is not None
        rows = check_inputs(request, entry.config)
        batcher = self.batchers.get((name, ver.version))
        if batcher is None or not self.ready:  # (or a rescan is starting a new version's)
            raise NotReady(
                f"model {name!r} is not being served (the server is starting or "
                "stopping); retry shortly",
                retry_after=1,
            )
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                outputs = await batcher.submit(request.tensors, rows)
        except TimeoutError:
            raise Overloaded(
                f"the request to model {name!r} took longer than the "
                f"{self.settings.request_timeout_s:g} s request timeout; the server is "
                "overloaded, retry later",
                retry_after=batcher.retry_after(),
            ) from None
        return entry, ver, outputs

    async def load(self, name: str) -> list[VersionEntry]:
        """Load every version of ``name`` now (management API).

        A version that is not ready (it failed to load, or did not fit) is tried again: its
        files are checked as at a scan, then it is loaded.
        """
        entry = self.repository.get(name)
        if entry.config is None:
            raise NotReady(f"model {name!r} cannot be loaded: {entry.error}")
        for ver in entry.versions.values():
            if ver.state is State.UNAVAILABLE:  # try again, from the file checks on
                try:
                    check_version(ver.path, entry.config)
                except (ModelLoadError, OSError) as exc:
                    ver.reason = str(exc)
                    raise NotReady(f"model {name!r} cannot be loaded: {exc}") from None
            if ver.state in (State.UNLOADED, State.UNAVAILABLE):
                ver.state, ver.reason = State.AVAILABLE, ""
            self.repository.unloaded.discard((name, ver.version))
            if (name, ver.version) not in self.batchers:
                self._add_batcher(entry, ver)
                if (name, ver.version) not in self.batchers:
                    raise NotReady(f"model {name!r} cannot be loaded: {ver.reason}")
            await asyncio.to_thread(self._load_now, entry, ver)  # logs with the request id
        return list(entry.versions.values())

    async def unload(self, name: str) -> list[VersionEntry]:
        """Unload every version of ``name``; it stays not ready until loaded again."""
        entry = self.repository.get(name)
        assert self.cache is not None
        for ver in entry.versions.values():
            self.cache.unload((name, ver.version))
            ver.state, ver.reason = State.UNLOADED, UNLOADED_REASON
            self.repository.unloaded.add((name, ver.version))
        return list(entry.versions.values())
