"""Loaded models under a memory budget: load on demand, least recently used eviction, pinning.

Thread-safe: batches call :meth:`ModelCache.use` from their worker threads. A version in use by
a running batch is never evicted; pinned versions are never evicted. A version unloaded while a
batch runs it leaves the cache at once, but its runner is closed (and its bytes freed) only when
that batch gives it back. When a load would not fit, idle unpinned versions are evicted
oldest-use first; if that is not enough the load fails with 503 and a Retry-After. An
out-of-memory error while loading evicts every idle unpinned version and retries once.

Example (a repository of one small model: its first use loads it, and it stays resident):
    >>> import tempfile, pathlib
    >>> import numpy as np
    >>> from slimtorch.models import create_model, save_model
    >>> from slimtorch.serve.repository import Repository
    >>> from slimtorch.serve.settings import ServeSettings
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = save_model(create_model("mlp"), d / "mlp" / "1", input_shape=(1, 28, 28), mean=[0.5],
    ...                std=[0.5], class_names=list("0123456789"))
    >>> repo = Repository(d, ServeSettings())
    >>> _ = repo.scan()
    >>> entry = repo.models["mlp"]
    >>> cache = ModelCache(budget_bytes=2 << 30)
    >>> with cache.use(entry.versions[1], entry.config, "cpu") as runner:
    ...     runner.run({"input": np.zeros((2, 1, 28, 28), np.float32)})["logits"].shape
    (2, 10)
    >>> cache.resident(), entry.versions[1].state
    ([('mlp', 1)], <State.READY: 'READY'>)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from slimtorch.core.errors import ModelLoadError, is_out_of_memory
from slimtorch.serve.errors import NotReady, Overloaded
from slimtorch.serve.metrics import ServeMetrics
from slimtorch.serve.model_config import ModelConfig
from slimtorch.serve.repository import State, VersionEntry
from slimtorch.serve.runners import Runner, estimate_memory, load_runner

logger = logging.getLogger(__name__)

Key = tuple[str, int]
Loader = Callable[[Path, ModelConfig, str], Runner]


@dataclasses.dataclass(eq=False)
class _Slot:
    entry: VersionEntry
    runner: Runner
    nbytes: int
    pinned: bool
    in_use: int = 0


def _free_gpu_cache() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class ModelCache:
    """Resident model versions under ``budget_bytes``.

    Args:
        budget_bytes: Bytes the resident models may need together.
        metrics: Where to report loads, evictions and memory (optional).
        loader: Loads a version (tests may pass another); default :func:`load_runner`.
    """

    def __init__(
        self,
        budget_bytes: int,
        metrics: ServeMetrics | None = None,
        loader: Loader = load_runner,
    ) -> None:
        if budget_bytes < 1:
            raise ValueError(f"budget_bytes must be >= 1, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.metrics = metrics
        self.loader = loader
        self._lock = threading.Lock()
        self._slots: OrderedDict[Key, _Slot] = OrderedDict()
        self._draining: list[_Slot] = []  # unloaded while batches still run them
        self._reserved = 0
        # one per version being loaded: an entry goes once no caller holds its lock
        self._load_locks: weakref.WeakValueDictionary[Key, threading.Lock] = (
            weakref.WeakValueDictionary()
        )
        if metrics is not None:
            metrics.memory_budget.set(budget_bytes)

    @property
    def used_bytes(self) -> int:
        """Bytes of the resident versions plus loads in progress."""
        with self._lock:
            return self._used()

    def _used(self) -> int:
        resident = sum(s.nbytes for s in self._slots.values())
        return resident + sum(s.nbytes for s in self._draining) + self._reserved

    def resident(self) -> list[Key]:
        """Resident versions, least recently used first."""
        with self._lock:
            return list(self._slots)

    def _report(self) -> None:
        if self.metrics is not None:
            self.metrics.models_loaded.set(len(self._slots))
            self.metrics.memory_used.set(self._used())

    def _evict_locked(self, key: Key, reason: str) -> None:
        slot = self._slots.pop(key)
        if slot.in_use:
            self._draining.append(slot)  # closed by the release of its last batch
        else:
            slot.runner.close()
        slot.entry.state, slot.entry.reason = State.AVAILABLE, reason
        if self.metrics is not None:
            self.metrics.evictions.labels(model=key[0]).inc()
        logger.info("evicted %s version %d (%s)", key[0], key[1], reason)

    def _make_room_locked(self, need: int, exclude: Key) -> bool:
        """Evict idle unpinned versions, least recently used first, until ``need`` bytes fit;
        evicts nothing when even evicting all of them would not make room."""
        evictable = [
            k for k, s in self._slots.items() if k != exclude and not s.pinned and s.in_use == 0
        ]
        if self._used() - sum(self._slots[k].nbytes for k in evictable) + need > self.budget_bytes:
            return False
        for key in evictable:
            if self._used() + need <= self.budget_bytes:
                break
            self._evict_locked(key, f"evicted to make room for {exclude[0]}")
        return self._used() + need <= self.budget_bytes

    def evict_idle(self, exclude: Key | None = None) -> int:
        """Evict every idle unpinned version except ``exclude``; returns how many."""
        with self._lock:
            keys = [
                k for k, s in self._slots.items() if k != exclude and not s.pinned and s.in_use == 0
            ]
            for k in keys:
                self._evict_locked(k, "evicted after an out-of-memory error")
            self._report()
        _free_gpu_cache()
        return len(keys)

    def unload(self, key: Key) -> bool:
        """Drop a version from memory (waits for nothing: a running batch keeps its runner,
        which is closed when the batch releases it)."""
        with self._lock:
            if key not in self._slots:
                return False
            self._evict_locked(key, "unloaded")
            self._report()
        _free_gpu_cache()
        return True

    def unfit_reason(self, need: int) -> str | None:
        """Why a version that needs ``need`` bytes can never load under the budget, or ``None``.

        Example:
            >>> ModelCache(1000).unfit_reason(5000).split(";")[0]
            'needs 5000 bytes but the memory budget is 1000'
            >>> ModelCache(1000).unfit_reason(500) is None
            True
        """
        if need <= self.budget_bytes:
            return None
        return (
            f"needs {need} bytes but the memory budget is {self.budget_bytes}; raise "
            "--memory-budget (SLIMTORCH_SERVE_MEMORY_BUDGET_BYTES) or lower the model's "
            "memory_bytes or max_batch_size"
        )

    def _acquire_resident(self, key: Key, entry: VersionEntry) -> Runner | None:
        slot = self._slots.get(key)
        if slot is None:
            return None
        if slot.entry.generation < entry.generation:  # loaded from the files a rescan replaced
            self._evict_locked(key, "its files changed on disk")
            return None
        self._slots.move_to_end(key)
        slot.in_use += 1
        return slot.runner

    def _release(self, key: Key, runner: Runner) -> None:
        with self._lock:
            slot = self._slots.get(key)
            if slot is not None and slot.runner is runner:
                slot.in_use -= 1
                return
            # the version was unloaded (and maybe loaded again) while this batch ran
            slot = next((s for s in self._draining if s.runner is runner), None)
            if slot is None:
                return
            slot.in_use -= 1
            if slot.in_use == 0:
                self._draining.remove(slot)
                slot.runner.close()
                self._report()

    def acquire(
        self, entry: VersionEntry, config: ModelConfig, device: str, *, pinned: bool = False
    ) -> Runner:
        """Return the version's runner, loading it if needed; the caller must :meth:`release`.

        Raises:
            NotReady: The version is broken (its reason is recorded on ``entry``) or can never
                fit the budget.
            Overloaded: It does not fit now (others are in use or pinned), or loading ran out
                of memory twice.
        """
        key = (entry.model, entry.version)
        with self._lock:
            runner = self._acquire_resident(key, entry)
            if runner is not None:
                return runner
            lock = self._load_locks.setdefault(key, threading.Lock())
        with lock:
            with self._lock:
                runner = self._acquire_resident(key, entry)
                if runner is not None:
                    return runner
            if entry.state in (State.UNAVAILABLE, State.UNLOADED):
                raise NotReady(
                    f"model {entry.model!r} version {entry.version} is not ready: {entry.reason}"
                )
            need = estimate_memory(entry.path, config)
            unfit = self.unfit_reason(need)
            if unfit is not None:
                entry.state, entry.reason = State.UNAVAILABLE, unfit
                logger.warning(
                    "model %s version %d cannot be loaded: %s", entry.model, entry.version, unfit
                )
                raise NotReady(f"model {entry.model!r} cannot be loaded: {entry.reason}")
            runner = self._load(entry, config, device, key, need)
            with self._lock:
                self._reserved -= need
                if entry.state is State.UNLOADED:  # unloaded through the API while loading
                    runner.close()
                    self._report()
                    raise NotReady(
                        f"model {entry.model!r} version {entry.version} was unloaded while it "
                        "was loading; load it again through the management API"
                    )
                nbytes = config.memory_bytes or runner.memory_bytes  # the config wins
                self._slots[key] = _Slot(entry, runner, nbytes, pinned, in_use=1)
                entry.state, entry.reason = State.READY, ""
                self._report()
            if self.metrics is not None:
                self.metrics.loads.labels(model=entry.model, result="ok").inc()
            return runner

    def _reserve(self, key: Key, need: int) -> None:
        with self._lock:
            if not self._make_room_locked(need, key):
                busy = [k[0] for k, s in self._slots.items() if s.pinned or s.in_use]
                self._report()
                raise Overloaded(
                    f"model {key[0]!r} needs {need} bytes but only "
                    f"{self.budget_bytes - self._used()} of the {self.budget_bytes}-byte budget "
                    f"are free, and evicting the idle models would not make room: the pinned or "
                    f"busy models {busy} hold the rest; retry later",
                    retry_after=1,
                )
            self._reserved += need
            self._report()

    def _load(
        self, entry: VersionEntry, config: ModelConfig, device: str, key: Key, need: int
    ) -> Runner:
        self._reserve(key, need)
        entry.state = State.LOADING
        for attempt in (1, 2):
            try:
                return self.loader(entry.path, config, device)
            except Exception as exc:
                oom = is_out_of_memory(exc)
                if oom and attempt == 1:
                    logger.warning(
                        "out of memory loading %s; evicting idle models and retrying once", key[0]
                    )
                    self.evict_idle(exclude=key)
                    continue
                with self._lock:
                    self._reserved -= need
                    self._report()
                if self.metrics is not None:
                    self.metrics.loads.labels(
                        model=entry.model, result="oom" if oom else "error"
                    ).inc()
                if oom:
                    entry.state = State.AVAILABLE
                    entry.reason = f"out of memory while loading: {exc}"
                    raise Overloaded(
                        f"model {entry.model!r} ran out of device memory while loading, even "
                        "after evicting the idle models; retry later or lower its memory needs",
                        retry_after=5,
                    ) from None
                entry.state = State.UNAVAILABLE
                entry.reason = (
                    str(exc)
                    if isinstance(exc, ModelLoadError)
                    else (f"{type(exc).__name__}: {exc}")
                )
                logger.error(
                    "model %s version %d failed to load: %s",
                    entry.model,
                    entry.version,
                    entry.reason,
                )
                raise NotReady(
                    f"model {entry.model!r} version {entry.version} failed to load: {entry.reason}"
                ) from None
        raise AssertionError("unreachable")

    def release(self, entry: VersionEntry, runner: Runner) -> None:
        """Give back the runner that :meth:`acquire` returned for ``entry``."""
        self._release((entry.model, entry.version), runner)

    @contextlib.contextmanager
    def use(
        self, entry: VersionEntry, config: ModelConfig, device: str, *, pinned: bool = False
    ) -> Iterator[Runner]:
        """:meth:`acquire` and :meth:`release` around a block."""
        runner = self.acquire(entry, config, device, pinned=pinned)
        try:
            yield runner
        finally:
            self.release(entry, runner)

    def close(self) -> None:
        """Unload everything."""
        with self._lock:
            for key in list(self._slots):
                self._evict_locked(key, "server stopped")
            self._report()
        _free_gpu_cache()
