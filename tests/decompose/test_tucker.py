from __future__ import annotations

import pytest
import tensorly as tl
import torch
from lowrank_data import orth, randn
from tensorly.decomposition import partial_tucker

from slimtorch.core.errors import DecompositionError
from slimtorch.decompose import relative_error, tucker2, tucker2_to_full


def exact_tucker2(gen: torch.Generator, c_out: int, c_in: int, r_out: int, r_in: int):
    core = randn(gen, r_out, r_in, 3, 3)
    return tucker2_to_full(core, orth(gen, c_out, r_out), orth(gen, c_in, r_in))


@pytest.mark.parametrize("n_iter", [0, 10])
def test_exact_tucker2_kernel_is_recovered(gen: torch.Generator, n_iter: int) -> None:
    w = exact_tucker2(gen, 24, 16, 6, 5)
    core, u_out, u_in = tucker2(w, (6, 5), n_iter=n_iter)
    assert core.shape == (6, 5, 3, 3) and u_out.shape == (24, 6) and u_in.shape == (16, 5)
    assert float(relative_error(tucker2_to_full(core, u_out, u_in), w)) < 1e-5
    torch.testing.assert_close(u_out.mT @ u_out, torch.eye(6, dtype=torch.float64))


def test_float32_input_gives_float32_factors(gen: torch.Generator) -> None:
    w = exact_tucker2(gen, 16, 8, 4, 4).float()
    core, u_out, u_in = tucker2(w, (4, 4))
    assert core.dtype == u_out.dtype == u_in.dtype == torch.float32
    assert float(relative_error(tucker2_to_full(core, u_out, u_in), w)) < 1e-4


def test_hooi_does_not_worsen_hosvd(gen: torch.Generator) -> None:
    w = randn(gen, 32, 24, 3, 3)
    err_hosvd = relative_error(tucker2_to_full(*tucker2(w, (8, 6), n_iter=0)), w)
    err_hooi = relative_error(tucker2_to_full(*tucker2(w, (8, 6), n_iter=30)), w)
    assert float(err_hooi) <= float(err_hosvd) + 1e-12


@pytest.mark.parametrize(("shape", "ranks"), [((32, 16, 3, 3), (8, 4)), ((20, 30, 5, 5), (5, 7))])
def test_parity_with_tensorly_partial_tucker(
    gen: torch.Generator, shape: tuple[int, ...], ranks: tuple[int, int]
) -> None:
    tl.set_backend("pytorch")
    w = randn(gen, *shape)
    ours = relative_error(tucker2_to_full(*tucker2(w, ranks, n_iter=50, tol=1e-10)), w)
    (core, factors), _ = partial_tucker(w, rank=list(ranks), modes=[0, 1], n_iter_max=50, tol=1e-10)
    theirs = relative_error(tl.tucker_to_tensor((core, factors), skip_factor=None), w)
    assert float(ours) <= float(theirs) + 1e-6


def test_bad_ranks_raise() -> None:
    w = torch.zeros(8, 4, 3, 3)
    with pytest.raises(ValueError, match=r"ranks\[1\] \(r_in\) must be in \[1, 4\]"):
        tucker2(w, (2, 5))
    with pytest.raises(ValueError, match="ranks must be a pair"):
        tucker2(w, (2,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_iter must be an int >= 0"):
        tucker2(w, (2, 2), n_iter=-1)


def test_nan_kernel_raises_decomposition_error() -> None:
    w = torch.ones(4, 4, 3, 3)
    w[0, 0, 0, 0] = float("nan")
    with pytest.raises(DecompositionError, match="NaN or Inf"):
        tucker2(w, (2, 2))


@pytest.mark.parametrize(
    ("shape", "ranks"),
    [((8, 2, 1, 1), (4, 1)), ((256, 64, 1, 1), (64, 16)), ((64, 256, 1, 1), (16, 64))],
)
def test_tucker2_on_non_square_1x1_kernels(shape: tuple[int, ...], ranks: tuple[int, int]) -> None:
    """r_out > r_in * k (or the reverse) leaves a tall projected unfolding: factors stay full."""
    w = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    core, u_out, u_in = tucker2(w, ranks)
    assert u_out.shape == (shape[0], ranks[0]) and u_in.shape == (shape[1], ranks[1])
    eye_o = torch.eye(ranks[0], dtype=w.dtype)
    torch.testing.assert_close(u_out.mT @ u_out, eye_o)
    torch.testing.assert_close(u_in.mT @ u_in, torch.eye(ranks[1], dtype=w.dtype))
    # the best rank-(r_out, r_in) approximation of a 1x1 kernel is the rank-min(r) SVD
    approx = tucker2_to_full(core, u_out, u_in)
    s = torch.linalg.svdvals(w[:, :, 0, 0])
    k = min(ranks)
    best = (s[k:] ** 2).sum().sqrt() / (s**2).sum().sqrt()
    assert float(relative_error(approx, w)) <= float(best) + 1e-9


def test_tucker2_1x1_kernel_needs_no_sweeps(gen: torch.Generator) -> None:
    """On a 1x1 kernel the HOSVD is already optimal: n_iter changes nothing."""
    w = randn(gen, 48, 24, 1, 1)
    a = tucker2_to_full(*tucker2(w, (12, 6), n_iter=0))
    b = tucker2_to_full(*tucker2(w, (12, 6), n_iter=30, tol=0.0))
    torch.testing.assert_close(a, b)


def test_check_every_does_not_change_the_result(gen: torch.Generator) -> None:
    """Sweeps run past convergence between host checks leave the factors unchanged."""
    w = exact_tucker2(gen, 20, 12, 5, 4) + 0.05 * randn(gen, 20, 12, 3, 3)
    one = tucker2(w, (5, 4), n_iter=50, tol=1e-10, check_every=1)
    five = tucker2(w, (5, 4), n_iter=50, tol=1e-10, check_every=5)
    for a, b in zip(one, five, strict=True):
        torch.testing.assert_close(a, b)


def test_hooi_matches_the_reference_sweeps(gen: torch.Generator) -> None:
    """Same fixed-sweep iterates as textbook HOOI (eigenvectors of the projected Grams)."""
    w = randn(gen, 12, 10, 3, 3)
    r_out, r_in = 4, 3

    def top(m: torch.Tensor, r: int) -> torch.Tensor:
        return torch.linalg.eigh(m @ m.mT)[1][:, -r:]

    u_in = top(w.transpose(0, 1).reshape(10, -1), r_in)
    for _ in range(4):
        u_out = top(torch.einsum("oik,ib->obk", w.flatten(2), u_in).reshape(12, -1), r_out)
        u_in = top(torch.einsum("oik,oa->iak", w.flatten(2), u_out).reshape(10, -1), r_in)
    ours = tucker2(w, (r_out, r_in), n_iter=4, tol=0.0)
    # Same subspaces (the bases may differ by a rotation) and so the same approximation.
    torch.testing.assert_close(ours.u_out @ ours.u_out.mT, u_out @ u_out.mT)
    torch.testing.assert_close(ours.u_in @ ours.u_in.mT, u_in @ u_in.mT)
    ref = tucker2_to_full(
        torch.einsum("oik,oa,ib->abk", w.flatten(2), u_out, u_in).reshape(r_out, r_in, 3, 3),
        u_out,
        u_in,
    )
    torch.testing.assert_close(tucker2_to_full(*ours), ref)


def test_check_every_must_be_a_positive_int() -> None:
    with pytest.raises(ValueError, match="check_every must be None or an int >= 1"):
        tucker2(torch.ones(4, 4, 3, 3), (2, 2), check_every=0)
