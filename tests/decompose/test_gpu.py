"""The same functions and layers on a CUDA/ROCm device: results stay on it and match the CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimtorch.decompose import (
    TuckerConfig,
    cp_als,
    decompose_,
    relative_error,
    truncated_svd,
    tt_svd,
    tt_to_full,
    tucker2,
    tucker2_to_full,
)

pytestmark = pytest.mark.gpu


@pytest.fixture
def dev() -> torch.device:
    return torch.device("cuda", 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_functions_run_on_the_gpu_and_match_cpu(dev: torch.device, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 16, 3, 3, generator=g, dtype=dtype)
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    a, b = truncated_svd(w.reshape(32, -1).to(dev), 8)
    assert a.device.type == "cuda" and a.dtype == dtype
    ref = relative_error(torch.matmul(*truncated_svd(w.reshape(32, -1), 8)), w.reshape(32, -1))
    assert abs(float(relative_error(a @ b, w.reshape(32, -1).to(dev))) - float(ref)) < tol
    core, u_out, u_in = tucker2(w.to(dev), (8, 4))
    err_gpu = relative_error(tucker2_to_full(core, u_out, u_in), w.to(dev))
    err_cpu = relative_error(tucker2_to_full(*tucker2(w, (8, 4))), w)
    assert core.device.type == "cuda" and abs(float(err_gpu) - float(err_cpu)) < tol
    cores = tt_svd(w.to(dev), eps=0.3)
    assert cores[0].device.type == "cuda"
    assert float(relative_error(tt_to_full(cores), w.to(dev))) <= 0.3 + tol
    res = cp_als(w.to(dev), 8, n_iter=50, require_convergence=False)
    assert res.weights.device.type == "cuda" and res.rel_error < 1.0


def test_decompose_on_gpu(dev: torch.device) -> None:
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3)).to(dev)
    x = torch.randn(2, 3, 12, 12, device=dev)
    report = decompose_(net, TuckerConfig(rank=0.5), include=["2"], example_input=x)
    assert report.rows[0].action == "decomposed"
    assert next(net[2].parameters()).device.type == "cuda"
    assert net(x).shape == (2, 32, 10, 10)


def test_whole_model_gate_compiled_on_gpu(dev: torch.device) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.Conv2d(128, 128, 3, padding=1)
    ).to(dev)
    cfg = TuckerConfig(
        rank=0.25, min_speedup=0.01, speed_scope="model", speed_compile=True, speed_batch=(8, 32)
    )
    report = decompose_(net, cfg, example_input=torch.randn(4, 64, 16, 16, device=dev))
    assert [r.action for r in report.rows] == ["decomposed", "decomposed"]
    assert all(r.speed_source == "measured-model:cuda:0,compiled" for r in report.rows)
    assert next(net.parameters()).device.type == "cuda"
    # the trial graphs were dropped: the chosen model compiles and runs without hitting a limit
    out = torch.compile(net, dynamic=False)(torch.randn(2, 64, 16, 16, device=dev))
    assert out.shape == (2, 128, 16, 16)
