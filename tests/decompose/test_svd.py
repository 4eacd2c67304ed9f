from __future__ import annotations

import pytest
import torch
from lowrank_data import randn

from slimtorch.decompose import relative_error, truncated_svd


def test_exact_low_rank_matrix_is_recovered(gen: torch.Generator) -> None:
    w = randn(gen, 40, 5) @ randn(gen, 5, 30)
    a, b = truncated_svd(w, 5)
    assert a.shape == (40, 5) and b.shape == (5, 30)
    assert float(relative_error(a @ b, w)) < 1e-12


def test_error_is_the_eckart_young_tail(gen: torch.Generator) -> None:
    w = randn(gen, 20, 12)
    s = torch.linalg.svdvals(w)
    a, b = truncated_svd(w, 4)
    expected = (s[4:] ** 2).sum().sqrt() / (s**2).sum().sqrt()
    torch.testing.assert_close(relative_error(a @ b, w), expected)


def test_keeps_dtype_and_device(gen: torch.Generator) -> None:
    w = randn(gen, 6, 4, dtype=torch.float32)
    a, b = truncated_svd(w, 2)
    assert a.dtype == b.dtype == torch.float32 and a.device == w.device


@pytest.mark.parametrize("rank", [0, 5])
def test_out_of_range_rank_raises(rank: int) -> None:
    with pytest.raises(ValueError, match=r"rank must be in \[1, 4\]"):
        truncated_svd(torch.zeros(4, 6), rank)


def test_bad_inputs_raise() -> None:
    with pytest.raises(TypeError, match="float32 or float64"):
        truncated_svd(torch.zeros(4, 4, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="must be 2-D"):
        truncated_svd(torch.zeros(2, 2, 2), 1)
    with pytest.raises(TypeError, match="rank must be an int"):
        truncated_svd(torch.zeros(4, 4), 2.0)  # type: ignore[arg-type]


def test_relative_error_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="one shape"):
        relative_error(torch.zeros(2), torch.zeros(3))


@pytest.mark.parametrize("shape", [(48, 200), (200, 48)])
def test_long_matrices_take_the_gram_route_at_the_optimal_error(shape: tuple[int, int]) -> None:
    # a 4096 x 25088 weight took 166 s in a full SVD; the Gram route gives the same product
    torch.manual_seed(0)
    s = torch.logspace(0, -2, min(shape), dtype=torch.float64)  # the singular values
    left, right = (torch.linalg.qr(torch.randn(n, len(s), dtype=s.dtype)).Q for n in shape)
    w = left * s @ right.mT
    for rank in (1, 12, 47):
        a, b = truncated_svd(w, rank)
        assert (a.shape, b.shape) == ((shape[0], rank), (rank, shape[1]))
        err = (a @ b - w).norm() / w.norm()
        assert float(err) == pytest.approx(float(s[rank:].norm() / s.norm()), abs=1e-12)
        torch.testing.assert_close(b @ b.mT, torch.eye(rank, dtype=w.dtype))


def test_a_matrix_with_zero_rows_leaves_no_dead_factor_rows() -> None:
    # through the Gram matrix, zero singular values became all-zero rows of the first factor,
    # which no gradient can revive; such matrices take the plain SVD
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
    w[24:] = 0.0  # rank 24
    a, b = truncated_svd(w, 32)
    assert int((a.abs().sum(1) == 0).sum()) <= 64 - 32  # only rows of w that are zero
    torch.testing.assert_close(b @ b.mT, torch.eye(32), atol=1e-4, rtol=0)
