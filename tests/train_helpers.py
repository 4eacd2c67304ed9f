"""Shared pieces of the slimtorch.train tests: a protocol-following loader, data, tiny models."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtorch.train import Callback, Trainer


class ListLoader:
    """(x, y) batches of fixed tensors; reshuffles per ``set_epoch`` and can shard for DDP.

    Each global batch of ``batch_size`` samples is split into ``world_size`` equal shards and
    this loader yields shard ``rank`` (the data layer's loaders do the same).
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        assert batch_size % world_size == 0
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.epochs_seen: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.epochs_seen.append(epoch)

    def __len__(self) -> int:
        return len(self.x) // self.batch_size

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(len(self.x))
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.x), generator=gen)

    def _batches(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._order()
        for b in range(start, len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            idx = idx[self.rank :: self.world_size]
            yield self.x[idx], self.y[idx]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._batches(0)


class StartBatchLoader(ListLoader):
    """A :class:`ListLoader` that also supports ``set_start_batch`` (records the calls)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.start = 0
        self.start_calls: list[int] = []

    def set_start_batch(self, k: int) -> None:
        self.start = k
        self.start_calls.append(k)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        start, self.start = self.start, 0
        return self._batches(start)


def make_blobs(n: int, seed: int = 0, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Four well-separated Gaussian blobs (centres 5 from the origin, unit noise): separable."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.zeros(4, dim)
    centres[0, 0], centres[1, 0], centres[2, 1], centres[3, 1] = 5.0, -5.0, 5.0, -5.0
    y = torch.randint(0, 4, (n,), generator=gen)
    x = centres[y] + torch.randn(n, dim, generator=gen)
    return x, y


def make_mlp(dim: int = 8, hidden: int = 16, classes: int = 4, dropout: float = 0.0) -> nn.Module:
    """A tiny MLP (no BatchNorm, so DDP equals single-process training exactly)."""
    layers: list[nn.Module] = [nn.Linear(dim, hidden), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, classes))
    return nn.Sequential(*layers)


class Crash(RuntimeError):
    """What :class:`KillAt` raises."""


class KillAt(Callback):
    """Simulates a crash: raises :class:`Crash` after optimiser step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: Trainer, outputs: Any, loss: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            raise Crash(f"killed at step {self.step}")


def run_gloo_ranks(
    script: Path | str,
    *args: str,
    timeout: float = 120,
    nproc: int = 2,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``script`` under ``torch.distributed.run`` as ``nproc`` gloo processes on this host
    (extra environment variables in ``env``).

    The ranks import ``train_helpers`` too (the tests folder is put on ``PYTHONPATH``); one
    OpenMP thread each. With ``check``, fails the test with the tail of stderr when a rank
    fails; returns the finished process (its stderr holds both ranks' logs).
    """
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    full = {k: v for k, v in os.environ.items() if k not in drop} | (env or {})
    full["OMP_NUM_THREADS"] = "1"
    here = str(Path(__file__).parent)
    full["PYTHONPATH"] = os.pathsep.join([here, full.get("PYTHONPATH", "")])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={port}", str(script), *args]  # fmt: skip
    proc = subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0 or not check, proc.stderr[-4000:]
    return proc
