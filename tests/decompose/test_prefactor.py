"""decompose_ with batched factorisation: same layers and errors as one by one, fallbacks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import slimtorch.decompose.handlers as handlers
import slimtorch.decompose.prefactor as prefactor
from slimtorch.decompose import CPConfig, TuckerConfig, decompose_


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(1, 16, 3, padding=1)]
    for _ in range(3):  # three same-shape kernels: one batch group
        layers += [nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)]
    layers += [nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1)]
    return nn.Sequential(*layers).double().eval()


def _forbid(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{name} called: the batched result was not used")

    monkeypatch.setattr(handlers, name, fail)


@pytest.mark.parametrize(
    "config",
    [
        TuckerConfig(rank=0.5, n_iter=10),
        TuckerConfig(rank="budget:params=0.5", n_iter=10),
        CPConfig(rank=6, n_iter=40, tol=1e-12, require_convergence=False),
    ],
    ids=["tucker", "tucker-budget", "cp"],
)
def test_batched_equals_per_layer(config, monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    alone, batched = _net(), _net()
    off = dataclasses.replace(config, batch_kernels=False)
    on = dataclasses.replace(config, batch_kernels=True)
    report_alone = decompose_(alone, off, example_input=x)
    _forbid(monkeypatch, "tucker2" if isinstance(config, TuckerConfig) else "cp_als")
    report_batched = decompose_(batched, on, example_input=x)
    rows = list(zip(report_alone.rows, report_batched.rows, strict=True))
    assert [a.action for a, _ in rows] == [b.action for _, b in rows]
    assert sum(a.action == "decomposed" for a, _ in rows) >= 2
    for a, b in rows:
        assert a.ranks == b.ranks
        if a.rel_error is not None:
            assert b.rel_error == pytest.approx(a.rel_error, abs=1e-8)
    with torch.no_grad():
        torch.testing.assert_close(batched(x), alone(x), rtol=1e-7, atol=1e-7)


def test_nan_layer_skipped_with_its_reason_and_others_batched(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    net = _net()
    with torch.no_grad():
        net[4].weight[0, 0, 0, 0] = float("nan")
    _forbid(monkeypatch, "tucker2")
    report = decompose_(net, TuckerConfig(rank=0.5, n_iter=5, batch_kernels=True))
    by_name = {r.name: r for r in report.rows}
    assert by_name["4"].action == "skipped" and "NaN" in by_name["4"].reason
    assert by_name["2"].action == by_name["6"].action == "decomposed"


def test_a_failed_batch_falls_back_to_each_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("solver exploded")

    monkeypatch.setattr(prefactor, "tucker2_many", broken)
    net = _net()
    report = decompose_(net, TuckerConfig(rank=0.5, n_iter=5, batch_kernels=True))
    assert all(r.action == "decomposed" for r in report.rows[1:])


def test_unconverged_cp_in_a_batch_is_skipped_like_alone() -> None:
    cfg = CPConfig(rank=6, n_iter=2, tol=1e-14, require_convergence=True)
    alone = decompose_(_net(), dataclasses.replace(cfg, batch_kernels=False))
    batched = decompose_(_net(), dataclasses.replace(cfg, batch_kernels=True))
    for a, b in zip(alone.rows, batched.rows, strict=True):
        assert a.action == b.action
        if a.action == "skipped" and "did not converge" in a.reason:
            assert "did not converge" in b.reason


def test_no_batch_on_the_cpu_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    def unexpected(*args: object, **kwargs: object) -> None:
        raise AssertionError("batched on the CPU without batch_kernels=True")

    monkeypatch.setattr(prefactor, "tucker2_many", unexpected)
    report = decompose_(_net(), TuckerConfig(rank=0.5, n_iter=5))
    assert report.rows[1].action == "decomposed"


def test_batch_kernels_is_validated() -> None:
    with pytest.raises(ValueError, match="batch_kernels"):
        TuckerConfig(rank=0.5, batch_kernels="yes")  # type: ignore[arg-type]


@pytest.mark.gpu
def test_cuda_batches_by_default_and_matches_per_layer() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, device="cuda")
    alone, batched = _net().cuda(), _net().cuda()
    decompose_(alone, CPConfig(rank=6, n_iter=40, require_convergence=False, batch_kernels=False))
    decompose_(batched, CPConfig(rank=6, n_iter=40, require_convergence=False))
    with torch.no_grad():
        torch.testing.assert_close(batched(x), alone(x), rtol=1e-6, atol=1e-6)
