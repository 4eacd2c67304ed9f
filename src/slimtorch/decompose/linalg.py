"""Small linear-algebra building blocks shared by the decompositions.

Every function works on CPU and CUDA tensors of float32/float64 and keeps the input's device and
dtype.

Example:
    >>> w = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    >>> unfold(w, 1).shape
    torch.Size([4, 72])
    >>> float(relative_error(w, w))
    0.0
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from slimtorch.core.errors import DecompositionError

_T = TypeVar("_T")

_FLOATS = (torch.float32, torch.float64)


def check_float_tensor(x: object, name: str, *, min_ndim: int = 1) -> torch.Tensor:
    """Raise ``TypeError``/``ValueError`` unless ``x`` is a finite-dtype float32/float64 tensor.

    Example:
        >>> check_float_tensor(torch.zeros(2, 2), "weight", min_ndim=2).shape
        torch.Size([2, 2])
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(
            f"{name} must be float32 or float64, got {x.dtype}; convert it with .float() or "
            ".double() first"
        )
    if x.ndim < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimensions, got shape {tuple(x.shape)}"
        )
    return x


def check_rank(rank: object, name: str, *, full: int | None = None) -> int:
    """Return ``rank`` as an int after checking ``1 <= rank`` (and ``rank <= full`` if given).

    Example:
        >>> check_rank(3, "rank", full=4)
        3
    """
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"{name} must be an int, got {type(rank).__name__} ({rank!r})")
    if rank < 1 or (full is not None and rank > full):
        hi = "inf" if full is None else str(full)
        raise ValueError(f"{name} must be in [1, {hi}], got {rank}; pick a rank in that range")
    return rank


# Per float dtype: the integer type of its width, its mantissa bits and its exponent bias.
_FLOAT_BITS = {torch.float32: (torch.int32, 23, 127), torch.float64: (torch.int64, 52, 1023)}


def unit_scale(x: torch.Tensor, *, per_item: bool = False) -> torch.Tensor:
    """The power of two ``s`` with ``max|x| / s`` in ``[1, 2)``, so dividing by it is exact.

    The factorisations divide a weight by it first and multiply one factor (or the core) by it
    after, so their result does not depend on the weight's scale: the Gram matrices they form
    square the values, which overflows float32 for weights near 1e19 and underflows it for
    weights near 1e-20. ``s`` is 1 for an all-zero or non-finite ``x`` and stays a normal
    number of the dtype, so ``x / s`` is exact for every value within about 2^126 (float32) of
    the peak (smaller ones become subnormal and may round); it is built from the exponent bits
    on the device, without a host read.

    Args:
        x: A float32/float64 tensor.
        per_item: One scale per index of the first dimension, shape ``(B,)``, instead of one
            for the whole tensor (0-d).

    Returns:
        The scale(s), on ``x``'s device and dtype.

    Example:
        >>> unit_scale(torch.tensor([0.3, -5.0])).item(), unit_scale(torch.zeros(2)).item()
        (4.0, 1.0)
    """
    itype, mantissa, bias = _FLOAT_BITS[x.dtype]
    size = (x.shape[0],) if per_item else ()
    if x.numel() == 0:
        return torch.ones(size, dtype=x.dtype, device=x.device)
    flat = x.detach().abs().reshape(*size, -1)
    peak = flat.amax(-1)
    _, exp = torch.frexp(peak)  # peak = m * 2**exp with m in [0.5, 1)
    usable = (peak > 0) & torch.isfinite(peak)
    exp = torch.where(usable, exp - 1, torch.zeros_like(exp)).clamp(1 - bias, bias)
    return ((exp.to(itype) + bias) << mantissa).view(x.dtype)


def unfold(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding: the mode's fibres become the rows, ``(I_mode, prod(others))``.

    Example:
        >>> unfold(torch.zeros(2, 3, 4), 2).shape
        torch.Size([4, 6])
    """
    return tensor.movedim(mode, 0).reshape(tensor.shape[mode], -1)


# cuSOLVER's Jacobi solver (syevj), which PyTorch picks for float32 matrices of 32..512 rows on
# CUDA, took 2.0-2.7x longer on an H100 than the float64 divide-and-conquer solver (syevd) for
# 256..512 rows (13.9 vs 5.2 ms at 512), and about as long up to 128 rows (torch 2.11, CUDA 13,
# 2026-11-24; docs/benchmarks.md, decomposition speed).
_EIGH_FLOAT64_ROWS = (129, 512)


def sym_eigh(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` of symmetric (stacks of) matrices, ascending eigenvalues.

    A float32 matrix on an NVIDIA CUDA device with 129..512 rows is solved in float64 and the
    result cast back: faster there (see ``_EIGH_FLOAT64_ROWS``) and more accurate. Elsewhere this
    is ``torch.linalg.eigh`` itself; in particular on ROCm, whose solvers differ and where
    consumer GPUs such as the RX 580 run float64 at 1/16 of the float32 rate.

    Example:
        >>> vals, vecs = sym_eigh(torch.eye(3))
        >>> vals.tolist(), vecs.shape
        ([1.0, 1.0, 1.0], torch.Size([3, 3]))
    """
    lo, hi = _EIGH_FLOAT64_ROWS
    nvidia = gram.is_cuda and torch.version.hip is None
    if nvidia and gram.dtype == torch.float32 and lo <= gram.shape[-1] <= hi:
        vals, vecs = torch.linalg.eigh(gram.double())
        return vals.float(), vecs.float()
    vals, vecs = torch.linalg.eigh(gram)
    return vals, vecs


def leading_left_singular_vectors(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank`` leading left singular vectors of ``matrix`` as orthonormal columns.

    For a wide matrix (rows much fewer than columns, the usual case for a kernel's channel
    unfolding) the eigen-decomposition of the small Gram matrix ``M M^T`` is cheaper than an SVD
    of ``M``; otherwise a thin SVD is used. When ``rank`` exceeds the matrix's column count
    (a tall matrix has at most ``cols`` singular vectors, e.g. the projected unfolding of a 1x1
    kernel in HOOI) the basis is completed with orthonormal columns orthogonal to the singular
    vectors; they carry no energy, so the approximation is unchanged. ``rank`` must not exceed
    the row count. The Gram matrix is that of ``M`` divided by :func:`unit_scale`, so any finite
    scale of ``M`` gives the same vectors.

    Example:
        >>> leading_left_singular_vectors(torch.randn(4, 50), 2).shape
        torch.Size([4, 2])
    """
    rows, cols = matrix.shape
    if rank > rows:
        raise ValueError(f"rank must be <= the number of rows ({rows}), got {rank}")
    if 2 * rows <= cols:
        unit = matrix / unit_scale(matrix)  # exact: its Gram neither overflows nor underflows
        _, vecs = sym_eigh(unit @ unit.mT)  # (rows, rows), ascending eigenvalues
        return vecs[:, -rank:].flip(-1)
    u, _, _ = torch.linalg.svd(matrix, full_matrices=False)
    if rank > u.shape[1]:
        return _complete_basis(u, rank)
    return u[:, :rank]


def leading_singular_subspaces(
    matrix: torch.Tensor, left_rank: int, right_rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal bases of the leading left and right singular subspaces of one matrix.

    One symmetric eigen-decomposition of the smaller Gram matrix gives the right singular
    vectors (say ``cols <= rows``); the left ones are an orthonormalisation (QR) of ``M V_k``,
    which spans the same leading left subspace without a second decomposition. Columns beyond
    the matrix's rank are completed orthonormally (they carry no energy), so ``left_rank`` may
    reach the row count even when it exceeds the column count. ``M`` is divided by
    :func:`unit_scale` first, so any finite scale of it gives the same bases.

    Args:
        matrix: ``(rows, cols)`` float32/float64 matrix.
        left_rank: Left columns wanted, ``1 <= left_rank <= rows``.
        right_rank: Right columns wanted, ``1 <= right_rank <= cols``.

    Returns:
        ``(U, V)``: ``(rows, left_rank)`` and ``(cols, right_rank)`` with orthonormal columns,
        leading directions first.

    Example:
        >>> u, v = leading_singular_subspaces(torch.randn(40, 10), 12, 3)
        >>> u.shape, v.shape
        (torch.Size([40, 12]), torch.Size([10, 3]))
    """
    rows, cols = matrix.shape
    if not 1 <= left_rank <= rows or not 1 <= right_rank <= cols:
        raise ValueError(
            f"ranks must satisfy 1 <= left_rank <= {rows} and 1 <= right_rank <= {cols}, got "
            f"({left_rank}, {right_rank})"
        )
    if rows < cols:
        right, left = leading_singular_subspaces(matrix.mT, right_rank, left_rank)
        return left, right
    matrix = matrix / unit_scale(matrix)  # exact: its Gram neither overflows nor underflows
    _, vecs = sym_eigh(matrix.mT @ matrix)  # (cols, cols), ascending eigenvalues
    vecs = vecs.flip(-1)  # leading first
    k = min(left_rank, cols)
    left, _ = torch.linalg.qr(matrix @ vecs[:, :k])  # (rows, k), spans M's leading k directions
    if left_rank > k:
        left = _complete_basis(left, left_rank)
    return left, vecs[:, :right_rank]


def _complete_basis(u: torch.Tensor, rank: int) -> torch.Tensor:
    """Extend orthonormal columns ``u`` (rows, c) to (rows, rank) orthonormal columns."""
    rows, c = u.shape
    gen = torch.Generator().manual_seed(rank)  # deterministic completion
    extra = torch.randn(rows, rank - c, generator=gen, dtype=u.dtype).to(u.device)
    extra = extra - u @ (u.mT @ extra)  # remove the span of u, twice for stability
    extra = extra - u @ (u.mT @ extra)
    q, _ = torch.linalg.qr(extra)  # (rows, rank - c)
    return torch.cat([u, q], dim=1)


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values of a matrix, descending (same device and dtype).

    Example:
        >>> singular_values(torch.eye(3)).tolist()
        [1.0, 1.0, 1.0]
    """
    return torch.linalg.svdvals(matrix)


def relative_error(approx: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``||approx - ref||_F / ||ref||_F`` as a 0-d tensor (``||approx||_F`` when ``ref`` is 0).

    Args:
        approx: The approximation.
        ref: The reference, same shape.

    Returns:
        A 0-d tensor on the inputs' device.

    Raises:
        ValueError: the shapes differ.

    Example:
        >>> a = torch.ones(3)
        >>> float(relative_error(a * 1.1, a))  # doctest: +ELLIPSIS
        0.1000...
    """
    if approx.shape != ref.shape:
        raise ValueError(
            f"relative_error needs tensors of one shape, got {tuple(approx.shape)} and "
            f"{tuple(ref.shape)}; reconstruct the approximation to the reference's shape first"
        )
    diff = norm64(approx - ref)
    norm = norm64(ref)
    return diff / norm if bool(norm > 0) else diff


def norm64(x: torch.Tensor) -> torch.Tensor:
    """The Frobenius norm of ``x``, summed in float64 (a 0-d float64 tensor).

    ``torch.linalg.vector_norm`` of a float32 tensor accumulates in float32 on the CPU: for a
    4096 x 25088 weight (103M values) it read 1.2% low, so relative errors and TT energy
    thresholds came out wrong by as much.

    Example:
        >>> float(norm64(torch.full((4,), 0.5)))
        1.0
    """
    return torch.linalg.vector_norm(x, dtype=torch.float64)  # upcast before squaring


def check_each(
    who: str,
    names: tuple[str, str],
    tensors: Sequence[torch.Tensor],
    ranks: Sequence[object],
    check: Callable[[int, torch.Tensor, object], _T],
) -> list[_T]:
    """Run ``check(i, tensor, rank)`` on every pair; one error that names every bad index.

    ``names`` are the argument names for the messages (e.g. ``("kernels", "ranks")``). Raises
    ``ValueError`` for a length mismatch, and for bad items a ``TypeError`` (all type errors) or
    ``ValueError`` listing each item's message.

    Example:
        >>> check_each("f", ("xs", "ranks"), [torch.zeros(2, 2)], [1], lambda i, t, r: r)
        [1]
    """
    if len(tensors) != len(ranks):
        raise ValueError(
            f"{names[0]} and {names[1]} must have one entry each per item, got "
            f"{len(tensors)} {names[0]} and {len(ranks)} {names[1]}"
        )
    problems: list[Exception] = []
    out: list[_T] = []
    for i, (tensor, rank) in enumerate(zip(tensors, ranks, strict=True)):
        try:
            out.append(check(i, tensor, rank))
        except (TypeError, ValueError) as exc:
            problems.append(exc)
    if problems:
        kind = TypeError if all(isinstance(p, TypeError) for p in problems) else ValueError
        lines = "\n  ".join(str(p) for p in problems)
        raise kind(f"{who}: {len(problems)} bad input(s):\n  {lines}")
    return out


def stack_groups(
    who: str, what: str, tensors: Sequence[torch.Tensor], ranks: Sequence[Any]
) -> dict[tuple[Any, ...], tuple[list[int], torch.Tensor]]:
    """Stack same (shape, rank, dtype, device) tensors: key -> (input indices, ``(B, ...)``).

    Raises :class:`~slimtorch.core.errors.DecompositionError` naming every tensor that holds
    NaN or Inf (one host read per group).

    Example:
        >>> ts = [torch.ones(2, 2), torch.ones(3), torch.ones(2, 2)]
        >>> groups = stack_groups("f", "tensors", ts, [1, 1, 1])
        >>> [(idx, tuple(stack.shape)) for idx, stack in groups.values()]
        [([0, 2], (2, 2, 2)), ([1], (1, 3))]
    """
    index: dict[tuple[Any, ...], list[int]] = {}
    for i, (tensor, rank) in enumerate(zip(tensors, ranks, strict=True)):
        key = (tuple(tensor.shape), rank, tensor.dtype, tensor.device)
        index.setdefault(key, []).append(i)
    groups = {key: (idx, torch.stack([tensors[i] for i in idx])) for key, idx in index.items()}
    bad: list[int] = []
    for idx, stack in groups.values():
        finite = torch.isfinite(stack).flatten(1).all(1).tolist()
        bad += [i for i, ok in zip(idx, finite, strict=True) if not ok]
    if bad:
        raise DecompositionError(
            f"{who}: {what} {sorted(bad)} hold NaN or Inf values; expected finite values; fix "
            "or re-initialise those layers before decomposing them"
        )
    return groups
