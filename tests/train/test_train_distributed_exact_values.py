"""Exact values of the data-parallel helpers: environment parsing, when a process group is
joined, the replica fingerprints and what the collectives are called with (no process group
is started: the collectives are stand-ins)."""

from __future__ import annotations

import datetime
import sys
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from slimtorch.train import distributed as D

TORCHRUN_ENV = {
    "RANK": "0",
    "WORLD_SIZE": "2",
    "LOCAL_RANK": "0",
    "LOCAL_WORLD_SIZE": "1",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29555",
}


def _no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_an_empty_local_rank_reads_as_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "")
    assert D.get_local_rank() == 0


def test_a_world_size_of_zero_joins_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in D._ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "0")
    assert D.init_distributed() is False


def test_forcing_without_torchrun_joins_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in D._ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLIMTORCH_DIST_FORCE", "1")
    assert D.init_distributed() is False


def _start(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    for k, v in TORCHRUN_ENV.items():
        monkeypatch.setenv(k, v)
    started: list[dict[str, Any]] = []
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: started.append(kw))
    monkeypatch.setattr(D, "is_initialized", lambda: False)
    return started


def test_the_timeout_and_env_method_are_passed_to_the_process_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _no_gpu(monkeypatch)
    started = _start(monkeypatch)
    monkeypatch.delenv("SLIMTORCH_DIST_BACKEND", raising=False)
    D.init_distributed(timeout_s=90.0)
    assert started == [
        {"backend": "gloo", "init_method": "env://", "timeout": datetime.timedelta(seconds=90)}
    ]


def test_nccl_with_one_process_per_gpu_is_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    chosen: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    started = _start(monkeypatch)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    D.init_distributed(backend="nccl")
    assert [kw["backend"] for kw in started] == ["nccl"] and chosen == [1]


def test_a_group_of_one_is_data_parallel_only_when_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(D, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 1)
    monkeypatch.delenv("SLIMTORCH_DIST_FORCE", raising=False)
    assert D.data_parallel() is False
    monkeypatch.setenv("SLIMTORCH_DIST_FORCE", "1")
    assert D.data_parallel() is True
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.delenv("SLIMTORCH_DIST_FORCE")
    assert D.data_parallel() is True


def test_fingerprints_are_sum_sum_of_squares_and_position_weighted_sum() -> None:
    t = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    prints = D._fingerprints([t, torch.tensor([])], torch.device("cpu"))
    # weights 1, 2, 3, 4: 1 - 4 + 9 + 2 = 8
    expected = torch.tensor([[2.5, 14.25, 8.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(prints, expected, rtol=0, atol=0)


def test_fingerprint_weights_wrap_after_997_positions() -> None:
    t = torch.zeros(999)
    t[996], t[997], t[998] = 1.0, 1.0, 1.0  # weights 997, 1, 2
    prints = D._fingerprints([t], torch.device("cpu"))
    assert prints[0].tolist() == [3.0, 3.0, 1000.0]


def _fake_group(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    calls: list[tuple[str, Any]] = []
    monkeypatch.setattr(D, "data_parallel", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(dist, "broadcast", lambda t, src: calls.append(("broadcast", t.dtype)))
    return calls


def test_boolean_buffers_are_broadcast_as_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_group(monkeypatch)
    net = nn.Module()
    net.register_buffer("mask", torch.ones(3, dtype=torch.bool))
    net.register_buffer("stat", torch.zeros(3))
    assert D.broadcast_buffers_(net) == 2
    assert calls == [("broadcast", torch.uint8), ("broadcast", torch.float32)]


def test_only_tensors_whose_fingerprints_differ_somewhere_are_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _fake_group(monkeypatch)

    def all_reduce(t: torch.Tensor, op: Any = None) -> None:
        if op == dist.ReduceOp.MAX:
            t[1, 2] += 1.0  # another rank's "b" differs in its position-weighted sum alone

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    net = nn.Module()
    net.a = nn.Parameter(torch.ones(2))
    net.b = nn.Parameter(torch.ones(2))
    assert D.replica_mismatches(net) == ["b"]


def test_leaving_while_an_error_propagates_skips_the_barrier(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(D, "is_initialized", lambda: True)
    monkeypatch.setattr(D, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    try:
        raise RuntimeError("rank 1 failed")
    except RuntimeError:
        assert sys.exc_info()[0] is RuntimeError
        D.cleanup()
    assert calls == ["destroy"]
    D.cleanup()
    assert calls == ["destroy", "barrier", "destroy"]


def test_a_gloo_barrier_names_no_device(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(D, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(dist, "barrier", lambda **kw: calls.append(kw))
    D.barrier()
    monkeypatch.setattr(dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    D.barrier()
    assert calls == [{}, {"device_ids": [3]}]
