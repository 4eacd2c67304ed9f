from __future__ import annotations

import logging

import pytest
import torch
from lowrank_data import randn

from slimtorch.core.errors import DecompositionError
from slimtorch.decompose import CPResult, cp_als, cp_als_many, cp_to_full, relative_error


def low_rank(gen: torch.Generator, shape: tuple[int, ...], rank: int) -> torch.Tensor:
    factors = [randn(gen, n, rank) for n in shape]
    return cp_to_full(torch.ones(rank, dtype=torch.float64), factors)


def assert_same(many: CPResult, single: CPResult, rtol: float = 1e-9, atol: float = 1e-9) -> None:
    assert many.iterations == single.iterations
    assert many.converged == single.converged
    assert len(many.errors) == len(single.errors)
    assert many.errors == pytest.approx(single.errors, rel=rtol, abs=atol)
    assert many.rel_error == pytest.approx(single.rel_error, rel=rtol, abs=atol)
    torch.testing.assert_close(many.weights, single.weights, rtol=rtol, atol=atol)
    assert len(many.factors) == len(single.factors)
    for a, b in zip(many.factors, single.factors, strict=True):
        assert a.dtype == b.dtype and a.device == b.device
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("batch", [1, 4])
def test_same_shape_batch_equals_cp_als(gen: torch.Generator, batch: int) -> None:
    ws = [randn(gen, 10, 8, 3, 3) for _ in range(batch)]
    opts = {"n_iter": 40, "tol": 1e-9, "require_convergence": False}
    many = cp_als_many(ws, [5] * batch, **opts)
    assert len(many) == batch
    for w, res in zip(ws, many, strict=True):
        assert_same(res, cp_als(w, 5, **opts))


def test_mixed_shapes_ranks_and_dtypes_in_input_order(gen: torch.Generator) -> None:
    specs = [
        ((8, 6, 3, 3), 3),
        ((6, 5, 3, 3), 4),
        ((8, 6, 3, 3), 3),
        ((7, 6, 5), 3),
        ((8, 6, 3, 3), 5),  # same shape, other rank: its own group
        ((4, 3, 3, 3), 7),  # rank past mode sizes: seeded random columns
        ((8, 6, 3, 3), 3),
    ]
    ws = [randn(gen, *s) for s, _ in specs]
    ws.append(ws[0].float())  # float32: its own group
    ranks = [r for _, r in specs] + [3]
    opts = {"n_iter": 30, "tol": 1e-9, "require_convergence": False, "seed": 5}
    many = cp_als_many(ws, ranks, **opts)
    for w, r, res in zip(ws[:-1], ranks[:-1], many[:-1], strict=True):
        assert [tuple(f.shape) for f in res.factors] == [(n, r) for n in w.shape]
        assert_same(res, cp_als(w, r, **opts))
    loose = {"rtol": 1e-4, "atol": 1e-4}  # float32 rounding differs between batched and single
    assert many[-1].weights.dtype == torch.float32
    assert_same(many[-1], cp_als(ws[-1], 3, **opts), **loose)


def test_exact_low_rank_tensors_are_recovered(gen: torch.Generator) -> None:
    ws = [low_rank(gen, (10, 8, 3, 3), 3) for _ in range(3)] + [low_rank(gen, (8, 7, 6), 3)]
    many = cp_als_many(ws, [3] * 4, n_iter=2000, tol=1e-13)
    for w, res in zip(ws, many, strict=True):
        assert res.converged and res.iterations < 2000
        assert res.rel_error < 1e-5
        assert float(relative_error(res.to_full(), w)) < 1e-5
        norms = torch.stack([torch.linalg.vector_norm(f, dim=0) for f in res.factors])
        torch.testing.assert_close(norms, torch.ones_like(norms))
        single = cp_als(w, 3, n_iter=2000, tol=1e-13)
        assert res.iterations == single.iterations
        torch.testing.assert_close(res.to_full(), single.to_full())


@pytest.mark.parametrize("check_every", [1, 6])
def test_items_converge_at_their_own_sweep(gen: torch.Generator, check_every: int) -> None:
    """Low rank plus more or less noise: the items stop at different sweeps, and the group's
    later sweeps leave a converged item's factors as cp_als returns them."""
    base = [low_rank(gen, (9, 8, 3, 3), 3) for _ in range(4)]
    noise = (1e-4, 3e-2, 1e-3, 0.1)
    ws = [x + s * x.std() * randn(gen, *x.shape) for x, s in zip(base, noise, strict=True)]
    ws.append(randn(gen, 9, 8, 3, 3))  # never converges within the cap
    opts = {"n_iter": 150, "tol": 1e-8, "require_convergence": False}
    many = cp_als_many(ws, [3] * 5, check_every=check_every, **opts)
    singles = [cp_als(w, 3, check_every=check_every, **opts) for w in ws]
    sweeps = [r.iterations for r in singles]
    assert len(set(sweeps)) >= 4 and not singles[-1].converged and sweeps[-1] == 150
    assert all(r.converged for r in singles[:-1])
    for res, single in zip(many, singles, strict=True):
        assert_same(res, single, rtol=1e-7, atol=1e-8)


def test_zero_tensor_is_returned_as_cp_als_does(gen: torch.Generator) -> None:
    ws = [randn(gen, 6, 5, 3, 3), torch.zeros(6, 5, 3, 3, dtype=torch.float64)]
    many = cp_als_many(ws, [2, 2], n_iter=20, require_convergence=False)
    zero = cp_als(ws[1], 2, n_iter=20)
    assert many[1].iterations == 0 and many[1].converged and many[1].rel_error == 0.0
    assert_same(many[1], zero)
    assert_same(many[0], cp_als(ws[0], 2, n_iter=20, require_convergence=False))


def test_empty_input_gives_empty_list() -> None:
    assert cp_als_many([], []) == []


def test_bad_inputs_are_named() -> None:
    ok = torch.zeros(6, 4, 3, 3)
    with pytest.raises(TypeError, match="sequence of tensors"):
        cp_als_many(ok, [2])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="sequence of tensors"):
        cp_als_many(3, [2])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ranks must be a sequence of ints"):
        cp_als_many([ok], 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2 tensors and 1 ranks"):
        cp_als_many([ok, ok], [2])
    with pytest.raises(ValueError) as info:
        cp_als_many([ok, torch.zeros(6, 4), ok, ok], [2, 2, 0, 2.5])  # type: ignore[list-item]
    msg = str(info.value)
    assert "3 bad input(s)" in msg
    assert "tensors[1] must have at least 3 dimensions" in msg
    assert r"ranks[2] must be in [1, inf], got 0" in msg
    assert "ranks[3] must be an int" in msg
    with pytest.raises(TypeError, match=r"tensors\[1\] must be float32 or float64"):
        cp_als_many([ok, torch.zeros(6, 4, 3, 3, dtype=torch.int64)], [2, 2])
    with pytest.raises(TypeError, match=r"tensors\[0\] must be a torch.Tensor"):
        cp_als_many([[1.0]], [2])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="init must be 'svd' or 'random'"):
        cp_als_many([ok], [2], init="hosvd")
    with pytest.raises(ValueError, match="n_iter must be an int >= 1"):
        cp_als_many([ok], [2], n_iter=0)


def test_non_finite_tensors_are_all_named() -> None:
    ws = [torch.ones(6, 4, 3, 3) for _ in range(4)] + [torch.ones(5, 4, 3)]
    ws[1][0, 0, 0, 0] = float("nan")
    ws[4][1, 1, 1] = float("inf")
    with pytest.raises(DecompositionError, match=r"tensors \[1, 4\] hold NaN or Inf"):
        cp_als_many(ws, [2] * 5)


def test_singular_solve_names_the_item(
    gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    cholesky_ex = torch.linalg.cholesky_ex

    def failing_second(a: torch.Tensor, *args, **kwargs):
        chol, info = cholesky_ex(a, *args, **kwargs)
        return chol, info + torch.tensor([0, 1, 0])  # (B,) == (3,): item 1 fails

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing_second)
    ws = [randn(gen, 6, 5, 3, 3) for _ in range(3)]
    with pytest.raises(DecompositionError, match=r"singular normal matrix .* tensors\[1\] after 1"):
        cp_als_many(ws, [2] * 3, n_iter=5)


def test_non_convergence(gen: torch.Generator, caplog: pytest.LogCaptureFixture) -> None:
    ws = [low_rank(gen, (6, 5, 3, 3), 2), randn(gen, 8, 8, 3, 3), randn(gen, 8, 8, 3, 3)]
    with pytest.raises(DecompositionError, match=r"tensors \[1, 2\] did not converge"):
        cp_als_many(ws, [2, 5, 5], n_iter=30, tol=1e-6)
    with caplog.at_level(logging.WARNING, logger="slimtorch.decompose.cp_batched"):
        many = cp_als_many(ws, [2, 5, 5], n_iter=30, tol=1e-6, require_convergence=False)
    assert [r.converged for r in many] == [True, False, False]
    assert [r.iterations for r in many][1:] == [30, 30]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "tensors [1, 2] did not converge" in warnings[0].getMessage()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cp_als_on_cuda(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    dev = torch.device("cuda", 0)
    shapes = [(32, 16, 3, 3)] * 3 + [(16, 16, 3, 3)] * 2
    ws = [torch.randn(s, generator=g, dtype=dtype).to(dev) for s in shapes]
    ranks = [8, 8, 8, 4, 4]
    opts = {"n_iter": 50, "tol": 1e-6, "require_convergence": False}
    many = cp_als_many(ws, ranks, **opts)
    tol = 1e-3 if dtype == torch.float32 else 1e-8
    for w, r, res in zip(ws, ranks, many, strict=True):
        single = cp_als(w, r, **opts)
        assert res.weights.device.type == "cuda" and res.weights.dtype == dtype
        assert abs(res.rel_error - single.rel_error) < tol
        if dtype == torch.float64:
            assert res.iterations == single.iterations
            torch.testing.assert_close(res.to_full(), single.to_full(), rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
def test_cuda_graph_matches_eager_sweeps() -> None:
    """Graph replay (per-item solves, exact error always computed) gives the eager results."""
    g = torch.Generator().manual_seed(1)
    dev = torch.device("cuda", 0)
    ws = [torch.randn(24, 16, 3, 3, generator=g, dtype=torch.float64).to(dev) for _ in range(3)]
    ws.append(_exact_low_rank(dev))  # reaches the exact-error switch, then converges
    ranks = [6, 6, 6, 3]
    opts = {"n_iter": 200, "tol": 1e-9, "require_convergence": False, "check_every": 4}
    graphed = cp_als_many(ws, ranks, cuda_graph=True, **opts)
    eager = cp_als_many(ws, ranks, cuda_graph=False, **opts)
    for a, b in zip(graphed, eager, strict=True):
        assert a.iterations == b.iterations and a.converged == b.converged
        assert abs(a.rel_error - b.rel_error) < 1e-9
        torch.testing.assert_close(a.to_full(), b.to_full(), rtol=1e-7, atol=1e-7)
    assert graphed[3].converged and graphed[3].rel_error < 1e-6


def _exact_low_rank(dev: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    a, b, c, d = (torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (24, 16, 3, 3))
    return torch.einsum("ir,jr,kr,lr->ijkl", a, b, c, d).to(dev)
