from __future__ import annotations

import pytest
import tensorly as tl
import torch
from lowrank_data import randn
from tensorly.decomposition import parafac

from slimtorch.core.errors import DecompositionError
from slimtorch.decompose import cp_als, cp_to_full, relative_error


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
