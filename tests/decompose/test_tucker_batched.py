from __future__ import annotations

import pytest
import torch
from lowrank_data import orth, randn

from slimtorch.core.errors import DecompositionError
from slimtorch.decompose import relative_error, tucker2, tucker2_many, tucker2_to_full


def rel(factors, w: torch.Tensor) -> float:
    return float(relative_error(tucker2_to_full(*factors).double(), w.double()))


def exact(gen: torch.Generator, c_out: int, c_in: int, r_out: int, r_in: int, k: int = 3):
    core = randn(gen, r_out, r_in, k, k)
    return tucker2_to_full(core, orth(gen, c_out, r_out), orth(gen, c_in, r_in))


def test_mixed_shapes_match_or_beat_tucker2_in_input_order(gen: torch.Generator) -> None:
    # Repeated 3x3 and 1x1 shapes interleaved, one group with a fast (exact) and slow kernels.
    specs = [
        ((24, 16, 3, 3), (6, 4)),
        ((40, 12, 1, 1), (10, 3)),
        ((24, 16, 3, 3), (6, 4)),
        ((16, 8, 5, 5), (4, 2)),
        ((40, 12, 1, 1), (10, 3)),
        ((24, 16, 3, 3), (6, 4)),
        ((12, 40, 1, 1), (3, 10)),
    ]
    ws = [randn(gen, *s) for s, _ in specs]
    ws[2] = exact(gen, 24, 16, 6, 4) + 1e-3 * randn(gen, 24, 16, 3, 3)  # converges at once
    ranks = [r for _, r in specs]
    many = tucker2_many(ws, ranks, n_iter=30, tol=1e-9)
    assert len(many) == len(ws)
    for w, (r_out, r_in), f in zip(ws, ranks, many, strict=True):
        assert f.core.shape == (r_out, r_in, *w.shape[2:])
        assert f.u_out.shape == (w.shape[0], r_out) and f.u_in.shape == (w.shape[1], r_in)
        torch.testing.assert_close(f.u_out.mT @ f.u_out, torch.eye(r_out, dtype=w.dtype))
        torch.testing.assert_close(f.u_in.mT @ f.u_in, torch.eye(r_in, dtype=w.dtype))
        single = tucker2(w, (r_out, r_in), n_iter=30, tol=1e-9)
        assert rel(f, w) <= rel(single, w) + 1e-6


def test_exact_low_rank_kernels_equal_tucker2(gen: torch.Generator) -> None:
    ws = [exact(gen, 20, 12, 5, 3) for _ in range(3)] + [exact(gen, 20, 12, 5, 3, k=1)]
    ranks = [(5, 3)] * 4
    many = tucker2_many(ws, ranks)
    for w, r, f in zip(ws, ranks, many, strict=True):
        assert rel(f, w) == pytest.approx(rel(tucker2(w, r), w), abs=1e-5)
        assert rel(f, w) < 1e-6


@pytest.mark.parametrize(
    ("shape", "ranks"),
    [
        ((40, 10, 1, 1), (12, 3)),  # 1x1, left rank past the column count: completed basis
        ((20, 2, 3, 3), (20, 1)),  # sweeps through the SVD path with a completed basis
        ((6, 30), (2, 5)),  # a plain matrix
    ],
)
def test_edge_shapes_match_tucker2(
    gen: torch.Generator, shape: tuple[int, ...], ranks: tuple[int, int]
) -> None:
    ws = [randn(gen, *shape) for _ in range(2)]
    for w, f in zip(ws, tucker2_many(ws, [ranks, ranks], n_iter=10), strict=True):
        ref = tucker2(w, ranks, n_iter=10)
        assert rel(f, w) <= rel(ref, w) + 1e-6
        torch.testing.assert_close(f.u_out.mT @ f.u_out, torch.eye(ranks[0], dtype=w.dtype))


def test_hosvd_and_singleton_equal_tucker2(gen: torch.Generator) -> None:
    w = randn(gen, 16, 12, 3, 3)
    for n_iter in (0, 8):
        (f,) = tucker2_many([w], [(4, 3)], n_iter=n_iter)
        ref = tucker2(w, (4, 3), n_iter=n_iter)
        torch.testing.assert_close(tucker2_to_full(*f), tucker2_to_full(*ref))


def test_check_every_does_not_worsen_results(gen: torch.Generator) -> None:
    ws = [randn(gen, 16, 12, 3, 3) for _ in range(3)]
    every1 = tucker2_many(ws, [(4, 3)] * 3, n_iter=20, tol=1e-9, check_every=1)
    every4 = tucker2_many(ws, [(4, 3)] * 3, n_iter=20, tol=1e-9, check_every=4)
    for w, a, b in zip(ws, every1, every4, strict=True):
        assert rel(b, w) <= rel(a, w) + 1e-9


def test_dtypes_are_kept_apart(gen: torch.Generator) -> None:
    w64 = randn(gen, 16, 8, 3, 3)
    many = tucker2_many([w64.float(), w64], [(4, 2), (4, 2)], n_iter=5)
    assert [f.core.dtype for f in many] == [torch.float32, torch.float64]
    assert rel(many[0], w64) == pytest.approx(rel(many[1], w64), abs=1e-5)


def test_one_eigh_per_mode_and_sweep_for_a_group(
    gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, ...]] = []
    eigh = torch.linalg.eigh

    def counting(a: torch.Tensor, *args, **kwargs):
        calls.append(tuple(a.shape))
        return eigh(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", counting)
    ws = [randn(gen, 16, 16, 3, 3) for _ in range(4)] + [randn(gen, 32, 16, 1, 1)] * 2
    tucker2_many(ws, [(4, 4)] * 4 + [(8, 4)] * 2, n_iter=3, tol=0.0)
    # 3x3 group: 1 HOSVD + 3 sweeps x 2 modes, batch of 4; 1x1 group: one eigh, batch of 2.
    assert sorted(calls) == sorted([(4, 16, 16)] * 7 + [(2, 16, 16)])
    calls.clear()
    for w, r in zip(ws, [(4, 4)] * 4 + [(8, 4)] * 2, strict=True):
        tucker2(w, r, n_iter=3, tol=0.0)
    assert len(calls) == 4 * 7 + 2


def test_empty_input_gives_empty_list() -> None:
    assert tucker2_many([], []) == []


def test_every_bad_input_is_named() -> None:
    ok = torch.zeros(8, 4, 3, 3)
    with pytest.raises(ValueError) as info:
        tucker2_many([ok, torch.zeros(8), ok, ok], [(2, 2), (1, 1), (2, 5), (2,)])
    msg = str(info.value)
    assert "3 bad input(s)" in msg
    assert "kernels[1] must have at least 2 dimensions" in msg
    assert r"ranks[2][1] (r_in) must be in [1, 4], got 5" in msg
    assert "ranks[3] must be a pair (r_out, r_in)" in msg
    with pytest.raises(TypeError, match=r"kernels\[0\] must be float32 or float64"):
        tucker2_many([ok.half()], [(2, 2)])
    with pytest.raises(ValueError, match="2 kernels and 1 ranks"):
        tucker2_many([ok, ok], [(2, 2)])
    with pytest.raises(ValueError, match="n_iter must be an int >= 0"):
        tucker2_many([ok], [(2, 2)], n_iter=-1)
    with pytest.raises(TypeError, match="sequence of tensors"):
        tucker2_many(ok, [(2, 2)])  # type: ignore[arg-type]


def test_non_finite_kernels_are_all_named() -> None:
    ws = [torch.ones(8, 4, 3, 3) for _ in range(4)]
    ws[1][0, 0, 0, 0] = float("nan")
    ws[3][1, 1, 1, 1] = float("inf")
    with pytest.raises(DecompositionError, match=r"kernels \[1, 3\] hold NaN or Inf"):
        tucker2_many(ws, [(2, 2)] * 4)
