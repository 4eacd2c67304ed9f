from __future__ import annotations

import pytest
import tensorly as tl
import torch
from lowrank_data import randn
from tensorly.decomposition import tensor_train, tensor_train_matrix

from slimtorch.core.errors import DecompositionError
from slimtorch.decompose import relative_error, tt_matrix, tt_matrix_to_full, tt_svd, tt_to_full


def exact_tt(gen: torch.Generator, shape: tuple[int, ...], ranks: tuple[int, ...]) -> torch.Tensor:
    full_ranks = (1, *ranks, 1)
    cores = [randn(gen, full_ranks[k], n, full_ranks[k + 1]) for k, n in enumerate(shape)]
    return tt_to_full(cores)


def test_exact_tt_tensor_is_recovered_with_its_ranks(gen: torch.Generator) -> None:
    x = exact_tt(gen, (5, 6, 7, 4), (3, 4, 2))
    cores = tt_svd(x, eps=1e-10)
    assert [c.shape[2] for c in cores] == [3, 4, 2, 1]
    assert float(relative_error(tt_to_full(cores), x)) < 1e-5
    capped = tt_svd(x, max_rank=(3, 4, 2))
    assert float(relative_error(tt_to_full(capped), x)) < 1e-5


@pytest.mark.parametrize("eps", [0.05, 0.2, 0.5])
def test_eps_bound_holds(gen: torch.Generator, eps: float) -> None:
    x = randn(gen, 6, 5, 4, 6, 3)
    cores = tt_svd(x, eps=eps)
    assert float(relative_error(tt_to_full(cores), x)) <= eps
    full = tt_svd(x)
    kept, everything = sum(c.numel() for c in cores), sum(c.numel() for c in full)
    assert kept < everything if eps >= 0.2 else kept <= everything  # it truncated


def test_eps_zero_keeps_no_rounding_noise(gen: torch.Generator) -> None:
    # singular values of 1e-7 left by float rounding used to count: ones(4, 5, 6) got ranks 2, 3
    for dtype in (torch.float32, torch.float64):
        x = torch.ones(4, 5, 6, dtype=dtype)
        cores = tt_svd(x, eps=0.0)
        assert [c.shape[2] for c in cores] == [1, 1, 1]
        assert float(relative_error(tt_to_full(cores), x)) < 1e-6
    y = exact_tt(gen, (5, 6, 7, 4), (3, 4, 2))  # an exact TT tensor keeps exactly its ranks
    assert [c.shape[2] for c in tt_svd(y, eps=0.0)] == [3, 4, 2, 1]


def test_no_eps_keeps_everything(gen: torch.Generator) -> None:
    x = randn(gen, 3, 4, 5, dtype=torch.float32)
    cores = tt_svd(x)
    assert cores[0].dtype == torch.float32
    torch.testing.assert_close(tt_to_full(cores), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [2, 4])
def test_parity_with_tensorly_tensor_train(gen: torch.Generator, rank: int) -> None:
    tl.set_backend("pytorch")
    x = randn(gen, 6, 5, 4, 6)
    ours = relative_error(tt_to_full(tt_svd(x, max_rank=rank)), x)
    theirs = relative_error(tl.tt_to_tensor(tensor_train(x, rank=[1, rank, rank, rank, 1])), x)
    assert float(ours) <= float(theirs) + 1e-8


def test_tt_matrix_round_trip_and_parity(gen: torch.Generator) -> None:
    tl.set_backend("pytorch")
    w = randn(gen, 24, 20)  # (out, in)
    cores = tt_matrix(w, in_modes=(4, 5), out_modes=(4, 6))
    assert [tuple(c.shape) for c in cores] == [(1, 4, 4, 16), (16, 6, 5, 1)]
    torch.testing.assert_close(tt_matrix_to_full(cores), w)
    ours = relative_error(tt_matrix_to_full(tt_matrix(w, (4, 5), (4, 6), max_rank=5)), w)
    tens = w.reshape(4, 6, 4, 5)  # (m1, m2, n1, n2): tensorly wants (rows..., cols...)
    theirs_cores = tensor_train_matrix(tens, rank=[1, 5, 1])
    theirs = relative_error(tl.tt_matrix_to_tensor(theirs_cores).reshape(24, 20), w)
    assert float(ours) <= float(theirs) + 1e-8


def test_tt_matrix_of_exact_low_rank(gen: torch.Generator) -> None:
    cores = [randn(gen, 1, 2, 3, 2), randn(gen, 2, 4, 2, 3), randn(gen, 3, 2, 2, 1)]
    w = tt_matrix_to_full(cores)  # (16, 12)
    got = tt_matrix(w, (3, 2, 2), (2, 4, 2), eps=1e-10)
    assert [c.shape[3] for c in got] == [2, 3, 1]
    assert float(relative_error(tt_matrix_to_full(got), w)) < 1e-5


def test_bad_modes_and_arguments_raise() -> None:
    w = torch.zeros(12, 8)
    with pytest.raises(ValueError, match=r"prod\(in_modes\)=6"):
        tt_matrix(w, (2, 3), (3, 4))
    with pytest.raises(ValueError, match="one equal length"):
        tt_matrix(w, (8,), (12,))
    with pytest.raises(ValueError, match=r"eps must be a number in \[0, 1\)"):
        tt_svd(torch.zeros(2, 2), eps=1.5)
    with pytest.raises(ValueError, match="max_rank must be an int or a sequence"):
        tt_svd(torch.zeros(2, 2, 2), max_rank=(1, 2, 3))
    bad = torch.ones(2, 2, 2)
    bad[0, 0, 0] = float("nan")
    with pytest.raises(DecompositionError, match="NaN or Inf"):
        tt_svd(bad)
