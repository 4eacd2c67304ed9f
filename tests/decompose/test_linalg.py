from __future__ import annotations

import pytest
import torch
from lowrank_data import orth, randn

from slimtorch.decompose.cp import khatri_rao
from slimtorch.decompose.linalg import leading_singular_subspaces, sym_eigh


@pytest.mark.parametrize(
    ("shape", "ranks"), [((30, 12), (5, 4)), ((12, 30), (4, 5)), ((20, 20), (20, 3))]
)
def test_leading_singular_subspaces_match_the_svd(
    gen: torch.Generator, shape: tuple[int, int], ranks: tuple[int, int]
) -> None:
    s = torch.linspace(10.0, 1.0, min(shape), dtype=torch.float64)  # distinct singular values
    u0, v0 = orth(gen, shape[0], min(shape)), orth(gen, shape[1], min(shape))
    m = u0 * s @ v0.mT
    u, v = leading_singular_subspaces(m, *ranks)
    assert u.shape == (shape[0], ranks[0]) and v.shape == (shape[1], ranks[1])
    torch.testing.assert_close(u.mT @ u, torch.eye(ranks[0], dtype=m.dtype))
    torch.testing.assert_close(v.mT @ v, torch.eye(ranks[1], dtype=m.dtype))
    ul, vl = u0[:, : ranks[0]], v0[:, : ranks[1]]
    torch.testing.assert_close(u @ u.mT, ul @ ul.mT)
    torch.testing.assert_close(v @ v.mT, vl @ vl.mT)


def test_leading_singular_subspaces_complete_beyond_the_rank(gen: torch.Generator) -> None:
    """A tall (8, 2) matrix has two left singular vectors; four are asked for."""
    m = randn(gen, 8, 2)
    u, v = leading_singular_subspaces(m, 4, 1)
    torch.testing.assert_close(u.mT @ u, torch.eye(4, dtype=m.dtype))
    # the span of u contains the column space of m
    torch.testing.assert_close(u @ (u.mT @ m), m)
    assert v.shape == (2, 1)


def test_leading_singular_subspaces_reject_bad_ranks() -> None:
    with pytest.raises(ValueError, match="1 <= left_rank <= 3"):
        leading_singular_subspaces(torch.ones(3, 5), 4, 1)


def test_khatri_rao_rows_follow_a_row_major_reshape(gen: torch.Generator) -> None:
    a, b, c = randn(gen, 3, 2), randn(gen, 4, 2), randn(gen, 5, 2)
    kr = khatri_rao([a, b, c])
    ref = torch.einsum("ir,jr,kr->ijkr", a, b, c).reshape(-1, 2)
    torch.testing.assert_close(kr, ref)


def test_sym_eigh_matches_eigh_on_cpu() -> None:
    a = torch.randn(3, 200, 300)
    gram = a @ a.mT  # (3, 200, 200)
    vals, vecs = sym_eigh(gram)
    want_vals, want_vecs = torch.linalg.eigh(gram)
    assert vals.dtype == vecs.dtype == torch.float32
    torch.testing.assert_close(vals, want_vals)
    torch.testing.assert_close(vecs.abs(), want_vecs.abs(), atol=1e-3, rtol=0)


@pytest.mark.gpu
def test_sym_eigh_float64_route_on_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    a = torch.randn(2, 256, 512, device="cuda", dtype=torch.float64)
    gram64 = a @ a.mT  # (2, 256, 256), within the float64 route's sizes
    vals, vecs = sym_eigh(gram64.float())
    assert vals.dtype == vecs.dtype == torch.float32 and vecs.is_cuda
    want_vals, _ = torch.linalg.eigh(gram64)
    torch.testing.assert_close(vals.double(), want_vals, rtol=1e-5, atol=1e-3)
    top = vecs[..., -64:]  # leading subspace equals the float64 one's
    want = torch.linalg.eigh(gram64)[1][..., -64:].float()
    torch.testing.assert_close(top @ top.mT, want @ want.mT, atol=1e-4, rtol=0)


def test_relative_error_sums_in_float64() -> None:
    # float32 vector_norm of 10M values read 2.5e-4 low here (1.2% at 103M, a VGG fc6),
    # so reported errors and TT energy thresholds were off by as much
    from slimtorch.decompose.linalg import relative_error

    g = torch.Generator().manual_seed(0)
    ref, approx = torch.rand(10_000_000, generator=g), torch.rand(10_000_000, generator=g)
    want = (approx.double() - ref.double()).norm() / ref.double().norm()
    assert float(relative_error(approx, ref)) == pytest.approx(float(want), rel=1e-6)


def test_relative_error_of_half_tensors_does_not_overflow() -> None:
    # squaring in float16 overflowed at values near 300 (and underflowed near 1e-4): error 0
    from slimtorch.decompose.linalg import relative_error

    ref = torch.full((100,), 300.0, dtype=torch.float16)
    approx = ref * 1.01
    assert float(relative_error(approx, ref)) == pytest.approx(0.01, rel=0.05)
