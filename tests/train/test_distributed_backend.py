"""Backend choice and GPU assignment of data-parallel processes (no process group is started)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from slimtorch.train import distributed as D

TORCHRUN_ENV = {
    "RANK": "1",
    "WORLD_SIZE": "2",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29555",
}


def _torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in TORCHRUN_ENV.items():
        monkeypatch.setenv(k, v)


def _gpus(monkeypatch: pytest.MonkeyPatch, n: int) -> list[int]:
    chosen: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: chosen.append(i))
    return chosen


def test_processes_share_gpus_round_robin(monkeypatch: pytest.MonkeyPatch) -> None:
    _gpus(monkeypatch, 1)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert D.get_device_index() == 0
    _gpus(monkeypatch, 2)
    assert D.get_device_index() == 1
    _gpus(monkeypatch, 0)
    assert D.get_device_index() == 3


def test_nccl_with_more_processes_than_gpus_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _torchrun(monkeypatch)
    _gpus(monkeypatch, 1)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    monkeypatch.delenv("SLIMTORCH_DIST_BACKEND", raising=False)
    started: list[Any] = []
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: started.append(kw))
    with pytest.raises(RuntimeError, match="SLIMTORCH_DIST_BACKEND=gloo"):
        D.init_distributed()
    assert started == []


def test_backend_override_shares_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    _torchrun(monkeypatch)
    chosen = _gpus(monkeypatch, 1)
    monkeypatch.setenv("SLIMTORCH_DIST_BACKEND", "gloo")
    started: list[Any] = []
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: started.append(kw))
    monkeypatch.setattr(D, "is_initialized", lambda: False)
    D.init_distributed()
    assert started[0]["backend"] == "gloo"
    assert chosen == [0]  # rank 1 on the only GPU


def test_a_cuda_build_without_nccl_takes_gloo(monkeypatch: pytest.MonkeyPatch) -> None:
    # Windows builds have CUDA but no NCCL: init_process_group failed with "Distributed package
    # doesn't have NCCL built in"
    _torchrun(monkeypatch)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    _gpus(monkeypatch, 1)
    monkeypatch.delenv("SLIMTORCH_DIST_BACKEND", raising=False)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)
    started: list[Any] = []
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: started.append(kw))
    monkeypatch.setattr(D, "is_initialized", lambda: False)
    D.init_distributed()
    assert started[0]["backend"] == "gloo"
