"""Tensor-train (TT) decomposition by TT-SVD, and the TT-matrix format for linear layers.

TT-SVD (Oseledets, 2011, "Tensor-train decomposition", SIAM J. Sci. Comput. 33(5)) sweeps
left to right, truncating the SVD of each unfolding so that the discarded singular values of each
have norm at most ``eps / sqrt(d - 1) * ||A||``; the result then satisfies
``||A - TT|| <= eps ||A||``. A weight matrix ``W (prod(m_k), prod(n_k))`` is stored as a
TT-matrix (Novikov et al., 2015, "Tensorizing neural networks", arXiv:1509.06569): cores
``G_k (r_{k-1}, m_k, n_k, r_k)`` with
``W[(i_1..i_d), (j_1..j_d)] = G_1[i_1, j_1] ... G_d[i_d, j_d]``.

Example:
    >>> x = torch.randn(4, 5, 6, dtype=torch.float64)
    >>> cores = tt_svd(x)
    >>> torch.allclose(tt_to_full(cores), x)
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from slimtorch.core.errors import DecompositionError
from slimtorch.decompose.linalg import check_float_tensor, norm64


def _max_ranks(max_rank: int | Sequence[int] | None, d: int) -> list[int | None]:
    if max_rank is None:
        return [None] * (d - 1)
    if isinstance(max_rank, int) and not isinstance(max_rank, bool):
        ranks: list[int | None] = [max_rank] * (d - 1)
    elif isinstance(max_rank, Sequence) and len(max_rank) == d - 1:
        ranks = list(max_rank)
    else:
        raise ValueError(
            f"max_rank must be an int or a sequence of d - 1 = {d - 1} ints, got {max_rank!r}"
        )
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"max_rank entries must be ints >= 1, got {max_rank!r}")
    return ranks


def tt_svd(
    tensor: torch.Tensor,
    *,
    eps: float | None = None,
    max_rank: int | Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """TT decomposition by TT-SVD (Oseledets, 2011, SIAM J. Sci. Comput. 33(5)).

    Args:
        tensor: A float32/float64 tensor of order ``d >= 2`` with shape ``(n_1, ..., n_d)``.
        eps: Relative error bound in ``[0, 1)``: each unfolding drops the smallest singular
            values whose norm stays within ``eps / sqrt(d - 1) * ||tensor||``, which guarantees
            ``||tensor - TT|| <= eps ||tensor||``; ``0`` keeps those above rounding noise (a
            rank-1 tensor gets ranks 1). ``None`` keeps every singular value.
        max_rank: Cap on the TT ranks (an int, or one per bond, ``d - 1`` of them). The ``eps``
            guarantee holds only when the cap does not bind.

    Returns:
        ``d`` cores, core ``k`` of shape ``(r_{k-1}, n_k, r_k)`` with ``r_0 = r_d = 1``.

    Raises:
        TypeError, ValueError: bad arguments (named in the message).
        DecompositionError: the tensor holds NaN or Inf.

    Example:
        >>> [c.shape for c in tt_svd(torch.ones(2, 3, 4), eps=1e-6)]
        [torch.Size([1, 2, 1]), torch.Size([1, 3, 1]), torch.Size([1, 4, 1])]
    """
    check_float_tensor(tensor, "tensor", min_ndim=2)
    if eps is not None and (
        isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 <= eps < 1
    ):
        raise ValueError(f"eps must be a number in [0, 1) or None, got {eps!r}")
    if not bool(torch.isfinite(tensor).all()):
        raise DecompositionError(
            "tt_svd: the tensor holds NaN or Inf values; expected finite values; fix the "
            "weights before decomposing them"
        )
    shape = list(tensor.shape)
    d = len(shape)
    caps = _max_ranks(max_rank, d)
    delta = 0.0 if eps is None else eps / math.sqrt(d - 1) * float(norm64(tensor))
    cores: list[torch.Tensor] = []
    rank = 1
    rest = tensor.reshape(shape[0], -1)  # (r_0 n_1, n_2 ... n_d)
    for k in range(d - 1):
        u, s, vh = torch.linalg.svd(rest, full_matrices=False)
        # tail[j] = norm of the singular values from index j on; keep the fewest with tail <= delta
        tail = torch.flip(torch.cumsum(torch.flip(s**2, (0,)), 0), (0,)).sqrt()
        if eps is None:
            new_rank = s.numel()
        else:  # singular values at rounding noise (numpy's matrix_rank floor) count as zeros
            noise = float(s[0]) * max(rest.shape) * torch.finfo(s.dtype).eps
            new_rank = min(int((tail > delta).sum()), int((s > noise).sum()))
        new_rank = max(1, new_rank)
        cap = caps[k]
        if cap is not None:
            new_rank = min(new_rank, cap)
        cores.append(u[:, :new_rank].reshape(rank, shape[k], new_rank))  # (r_{k-1}, n_k, r_k)
        rest = s[:new_rank, None] * vh[:new_rank]  # (r_k, n_{k+1} ... n_d)
        rank = new_rank
        if k + 1 < d - 1:
            rest = rest.reshape(rank * shape[k + 1], -1)  # (r_k n_{k+1}, n_{k+2} ... n_d)
    cores.append(rest.reshape(rank, shape[-1], 1))  # (r_{d-1}, n_d, 1)
    return cores


def tt_to_full(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract TT cores ``(r_{k-1}, n_k, r_k)`` back into the full ``(n_1, ..., n_d)`` tensor.

    Example:
        >>> tt_to_full([torch.ones(1, 2, 1), torch.ones(1, 3, 1)]).shape
        torch.Size([2, 3])
    """
    full = cores[0].reshape(cores[0].shape[1], -1)  # (n_1, r_1)
    for core in cores[1:]:
        full = full @ core.reshape(core.shape[0], -1)  # (n_1..n_k, n_{k+1} r_{k+1})
        full = full.reshape(-1, core.shape[2])  # (n_1..n_{k+1}, r_{k+1})
    return full.reshape([c.shape[1] for c in cores])


def _check_modes(
    weight: torch.Tensor, in_modes: Sequence[int], out_modes: Sequence[int]
) -> tuple[list[int], list[int]]:
    ins, outs = list(in_modes), list(out_modes)
    if len(ins) != len(outs) or len(ins) < 2:
        raise ValueError(
            f"in_modes and out_modes must have one equal length >= 2, got {ins} and {outs}"
        )
    if any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in ins + outs):
        raise ValueError(f"modes must be positive ints, got in_modes={ins}, out_modes={outs}")
    if math.prod(outs) != weight.shape[0] or math.prod(ins) != weight.shape[1]:
        raise ValueError(
            f"modes do not match the weight (out_features, in_features) = {tuple(weight.shape)}: "
            f"prod(out_modes)={math.prod(outs)}, prod(in_modes)={math.prod(ins)}; choose modes "
            "whose products equal the feature counts"
        )
    return ins, outs


def tt_matrix(
    weight: torch.Tensor,
    in_modes: Sequence[int],
    out_modes: Sequence[int],
    *,
    eps: float | None = None,
    max_rank: int | Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """TT-matrix of a linear layer's weight (Novikov et al., 2015, arXiv:1509.06569).

    Args:
        weight: ``(out_features, in_features)`` as in ``nn.Linear``.
        in_modes: ``(n_1, ..., n_d)`` with ``prod == in_features``.
        out_modes: ``(m_1, ..., m_d)`` with ``prod == out_features``.
        eps: Relative error bound, as in :func:`tt_svd`.
        max_rank: TT rank cap, as in :func:`tt_svd`.

    Returns:
        ``d`` cores of shape ``(r_{k-1}, m_k, n_k, r_k)``.

    Raises:
        TypeError, ValueError: bad arguments (non-matching modes included).
        DecompositionError: the weight holds NaN or Inf.

    Example:
        >>> cores = tt_matrix(torch.randn(12, 8), in_modes=(2, 4), out_modes=(3, 4))
        >>> [tuple(c.shape) for c in cores]
        [(1, 3, 2, 6), (6, 4, 4, 1)]
    """
    check_float_tensor(weight, "weight", min_ndim=2)
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    ins, outs = _check_modes(weight, in_modes, out_modes)
    d = len(ins)
    t = weight.reshape(*outs, *ins)  # (m_1..m_d, n_1..n_d)
    perm = [p for k in range(d) for p in (k, d + k)]
    t = t.permute(perm).reshape([m * n for m, n in zip(outs, ins, strict=True)])  # (m_k n_k)_k
    cores = tt_svd(t, eps=eps, max_rank=max_rank)
    return [
        c.reshape(c.shape[0], m, n, c.shape[2])  # (r_{k-1}, m_k, n_k, r_k)
        for c, m, n in zip(cores, outs, ins, strict=True)
    ]


def tt_matrix_to_full(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rebuild the ``(prod(m_k), prod(n_k))`` matrix from TT-matrix cores.

    Example:
        >>> w = torch.randn(6, 4, dtype=torch.float64)
        >>> torch.allclose(tt_matrix_to_full(tt_matrix(w, (2, 2), (3, 2))), w)
        True
    """
    outs = [c.shape[1] for c in cores]
    ins = [c.shape[2] for c in cores]
    d = len(cores)
    flat = [c.reshape(c.shape[0], c.shape[1] * c.shape[2], c.shape[3]) for c in cores]
    t = tt_to_full(flat).reshape([x for m, n in zip(outs, ins, strict=True) for x in (m, n)])
    inverse = [2 * k for k in range(d)] + [2 * k + 1 for k in range(d)]
    return t.permute(inverse).reshape(math.prod(outs), math.prod(ins))
