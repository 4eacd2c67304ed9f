from __future__ import annotations

import pytest
import tensorly as tl
import torch
from lowrank_data import randn
from tensorly.decomposition import parafac

from slimtorch.core.errors import DecompositionError
from slimtorch.decompose import cp_als, cp_als_many, cp_to_full, relative_error


@pytest.mark.parametrize("shape", [(8, 7, 6), (10, 8, 3, 3)])
def test_exact_cp_tensor_is_recovered(gen: torch.Generator, shape: tuple[int, ...]) -> None:
    factors = [randn(gen, n, 3) for n in shape]
    x = cp_to_full(torch.ones(3, dtype=torch.float64), factors)
    result = cp_als(x, 3, n_iter=2000, tol=1e-13)
    assert result.converged and result.iterations < 2000
    assert result.rel_error < 1e-5
    assert float(relative_error(result.to_full(), x)) < 1e-5
    assert [f.shape for f in result.factors] == [(n, 3) for n in shape]
    norms = torch.stack([torch.linalg.vector_norm(f, dim=0) for f in result.factors])
    torch.testing.assert_close(norms, torch.ones_like(norms))


@pytest.mark.filterwarnings("ignore:Trying to compute SVD:UserWarning")
@pytest.mark.parametrize(("shape", "rank"), [((16, 12, 3, 3), 4), ((12, 10, 9), 6)])
def test_parity_with_tensorly_parafac_near_low_rank(
    gen: torch.Generator, shape: tuple[int, ...], rank: int
) -> None:
    """Low rank plus 1% noise: one basin, so both must reach the same error."""
    tl.set_backend("pytorch")
    x = cp_to_full(torch.ones(rank, dtype=torch.float64), [randn(gen, n, rank) for n in shape])
    x = x + 0.01 * x.std() * randn(gen, *shape)
    ours = cp_als(x, rank, n_iter=300, tol=1e-10, require_convergence=False)
    theirs = relative_error(tl.cp_to_tensor(parafac(x, rank, n_iter_max=300, tol=1e-10)), x)
    assert ours.rel_error <= float(theirs) + 1e-6


@pytest.mark.filterwarnings("ignore:Trying to compute SVD:UserWarning")
@pytest.mark.parametrize(("shape", "rank"), [((16, 12, 3, 3), 8), ((12, 10, 9), 6)])
def test_parity_with_tensorly_parafac_on_random_tensors(
    gen: torch.Generator, shape: tuple[int, ...], rank: int
) -> None:
    """Random tensors have many CP local minima; ALS runs from different starts land within 1%."""
    tl.set_backend("pytorch")
    x = randn(gen, *shape)
    ours = cp_als(x, rank, n_iter=200, tol=1e-9, require_convergence=False)
    cp = parafac(x, rank, n_iter_max=200, init="svd", tol=1e-9, random_state=0)
    theirs = relative_error(tl.cp_to_tensor(cp), x)
    assert ours.rel_error <= float(theirs) + 1e-2
    assert ours.errors[-1] == pytest.approx(ours.rel_error)


def test_errors_decrease_and_report_matches(gen: torch.Generator) -> None:
    x = randn(gen, 10, 9, 3, 3)
    result = cp_als(x, 6, n_iter=60, tol=0.0, require_convergence=False)
    assert not result.converged and result.iterations == 60 and len(result.errors) == 60
    assert result.errors[-1] <= result.errors[0]
    assert result.rel_error == pytest.approx(float(relative_error(result.to_full(), x)))


def test_rank_beyond_mode_sizes_is_filled_and_seeded(gen: torch.Generator) -> None:
    x = randn(gen, 4, 3, 3, 3)
    a = cp_als(x, 12, n_iter=20, tol=0.0, require_convergence=False, seed=3)
    b = cp_als(x, 12, n_iter=20, tol=0.0, require_convergence=False, seed=3)
    torch.testing.assert_close(a.factors[0], b.factors[0])
    assert a.factors[1].shape == (3, 12)


def test_non_convergence_raises_when_required(gen: torch.Generator) -> None:
    x = randn(gen, 8, 8, 3, 3)
    with pytest.raises(DecompositionError, match="did not converge"):
        cp_als(x, 5, n_iter=2, tol=0.0)


def test_nan_input_raises() -> None:
    x = torch.ones(3, 3, 3)
    x[1, 1, 1] = float("inf")
    with pytest.raises(DecompositionError, match="NaN or Inf"):
        cp_als(x, 2)


def test_bad_arguments_raise() -> None:
    x = torch.ones(3, 3, 3)
    with pytest.raises(ValueError, match=r"rank must be in \[1, inf\]"):
        cp_als(x, 0)
    with pytest.raises(ValueError, match="init must be 'svd' or 'random'"):
        cp_als(x, 2, init="hosvd")
    with pytest.raises(ValueError, match="reg must be a number >= 0"):
        cp_als(x, 2, reg=-1.0)
    with pytest.raises(ValueError, match="at least 3 dimensions"):
        cp_als(torch.ones(3, 3), 2)


def test_check_every_does_not_change_the_result(gen: torch.Generator) -> None:
    """Sweeps run past convergence between host checks leave the factors unchanged."""
    factors = [randn(gen, n, 3) for n in (9, 8, 3, 3)]
    x = cp_to_full(torch.ones(3, dtype=torch.float64), factors)
    x = x + 1e-3 * randn(gen, *x.shape)
    one = cp_als(x, 3, n_iter=400, tol=1e-9, check_every=1)
    seven = cp_als(x, 3, n_iter=400, tol=1e-9, check_every=7)
    assert one.converged and seven.converged
    assert one.iterations == seven.iterations and one.iterations % 7 != 0
    assert seven.errors == pytest.approx(one.errors, rel=1e-12)
    for a, b in zip(one.factors, seven.factors, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(one.weights, seven.weights)


@pytest.mark.parametrize("check_every", [1, 4, 8])
def test_an_exact_float32_kernel_is_not_stopped_by_the_coarse_error_estimate(
    gen: torch.Generator, check_every: int
) -> None:
    """Near float32 precision the Gram-identity error clamps to 0; a run checked every 8 sweeps
    (the GPU default) stopped there as converged, at 1e-4 from an exactly rank-5 tensor."""
    factors = [randn(gen, n, 5) for n in (32, 24, 3, 3)]
    x = cp_to_full(torch.ones(5, dtype=torch.float64), factors).float()
    opts = {"n_iter": 2000, "tol": 1e-9, "require_convergence": False}
    single = cp_als(x, 5, check_every=check_every, **opts)
    many = cp_als_many([x], [5], check_every=check_every, **opts)[0]
    assert single.rel_error < 1e-5 and many.rel_error < 1e-5


def test_sweep_errors_match_the_reconstruction(gen: torch.Generator) -> None:
    """The errors from Gram matrices and the last MTTKRP equal those of the full tensor."""
    x = randn(gen, 7, 6, 3, 3)
    long = cp_als(x, 5, n_iter=6, tol=0.0, require_convergence=False)
    for sweeps in (1, 3, 5):
        short = cp_als(x, 5, n_iter=sweeps, tol=0.0, require_convergence=False)
        assert short.rel_error == pytest.approx(float(relative_error(short.to_full(), x)))
        assert long.errors[sweeps - 1] == pytest.approx(short.rel_error, rel=1e-9)


def test_cp_to_full_matches_the_sum_of_outer_products(gen: torch.Generator) -> None:
    """The largest mode need not come first: (3, 11, 4) and (2, 3, 5, 4)."""
    for shape in ((3, 11, 4), (2, 3, 5, 4)):
        w = randn(gen, 4)
        factors = [randn(gen, n, 4) for n in shape]
        ref = torch.zeros(shape, dtype=torch.float64)
        for r in range(4):
            term = w[r] * factors[0][:, r]
            for f in factors[1:]:
                term = torch.tensordot(term, f[:, r], dims=0)  # outer product
            ref += term
        torch.testing.assert_close(cp_to_full(w, factors), ref)


def test_check_every_must_be_a_positive_int() -> None:
    with pytest.raises(ValueError, match="check_every must be None or an int >= 1"):
        cp_als(torch.ones(3, 3, 3), 2, check_every=0)
