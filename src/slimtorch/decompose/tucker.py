"""Tucker-2: partial Tucker decomposition of a conv kernel along its two channel modes.

A kernel ``W`` of shape ``(C_out, C_in, kh, kw)`` is approximated by
``W ~= core x_0 U_out x_1 U_in`` with orthonormal ``U_out (C_out, r_out)``,
``U_in (C_in, r_in)`` and ``core (r_out, r_in, kh, kw)``: a 1x1 conv into ``r_in`` channels, a
``kh x kw`` conv ``r_in -> r_out`` and a 1x1 conv back to ``C_out`` (Kim et al., 2016,
"Compression of deep convolutional neural networks for fast and low power mobile applications",
arXiv:1511.06530). The factors start from the truncated HOSVD and are refined by higher-order
orthogonal iteration (HOOI; De Lathauwer, De Moor and Vandewalle, 2000, "On the best rank-1 and
rank-(R1, R2, ..., RN) approximation of higher-order tensors", SIAM J. Matrix Anal. Appl. 21(4)).

Example:
    >>> w = torch.randn(32, 16, 3, 3, dtype=torch.float64)
    >>> core, u_out, u_in = tucker2(w, (8, 4))
    >>> core.shape, u_out.shape, u_in.shape
    (torch.Size([8, 4, 3, 3]), torch.Size([32, 8]), torch.Size([16, 4]))
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from slimtorch.core.errors import DecompositionError
from slimtorch.decompose.linalg import (
    check_float_tensor,
    check_rank,
    leading_left_singular_vectors,
    unfold,
)

logger = logging.getLogger(__name__)


class Tucker2Factors(NamedTuple):
    """The factors of a Tucker-2 decomposition; unpacks as ``core, u_out, u_in``."""

    core: torch.Tensor
    u_out: torch.Tensor
    u_in: torch.Tensor


def tucker2_to_full(core: torch.Tensor, u_out: torch.Tensor, u_in: torch.Tensor) -> torch.Tensor:
    """Rebuild the kernel ``core x_0 U_out x_1 U_in`` of shape ``(C_out, C_in, ...)``.

    Example:
        >>> w = torch.randn(6, 5, 3, 3, dtype=torch.float64)
        >>> torch.allclose(tucker2_to_full(*tucker2(w, (6, 5))), w)
        True
    """
    flat = core.reshape(core.shape[0], core.shape[1], -1)  # (r_out, r_in, k)
    full = torch.einsum("abk,oa,ib->oik", flat, u_out, u_in)  # (C_out, C_in, k)
    return full.reshape(u_out.shape[0], u_in.shape[0], *core.shape[2:])


def _project(weight: torch.Tensor, u: torch.Tensor, mode: int) -> torch.Tensor:
    """Contract ``weight``'s ``mode`` (0 or 1) with ``u``: ``weight x_mode u^T``."""
    if mode == 0:
        return torch.einsum("oik,or->rik", weight, u)  # (r_out, C_in, k)
    return torch.einsum("oik,ir->ork", weight, u)  # (C_out, r_in, k)


def tucker2(
    weight: torch.Tensor,
    ranks: tuple[int, int],
    *,
    n_iter: int = 25,
    tol: float = 1e-7,
) -> Tucker2Factors:
    """Tucker-2 of a kernel by HOSVD initialisation and HOOI (Kim et al., 2016, arXiv:1511.06530).

    Each HOOI sweep projects the kernel on the current input (output) factor and takes the
    leading left singular vectors of the projected mode unfolding, through the eigenvectors of
    its small Gram matrix. Iterations stop when the relative reconstruction error changes by less
    than ``tol``, or after ``n_iter`` sweeps (``n_iter=0`` returns the truncated HOSVD).

    Args:
        weight: Kernel of shape ``(C_out, C_in, *spatial)`` (2-D and higher), float32/float64,
            any device.
        ranks: ``(r_out, r_in)`` with ``1 <= r_out <= C_out`` and ``1 <= r_in <= C_in``.
        n_iter: Maximum number of HOOI sweeps, ``>= 0``.
        tol: Stop when the relative error changes by less than this between sweeps.

    Returns:
        ``Tucker2Factors(core, u_out, u_in)``: ``(r_out, r_in, *spatial)``, ``(C_out, r_out)``
        and ``(C_in, r_in)``, on the input's device and dtype.

    Raises:
        TypeError, ValueError: bad arguments (named in the message).
        DecompositionError: the kernel holds NaN/Inf.

    Example:
        >>> w = torch.randn(16, 8, 3, 3)
        >>> core, u_out, u_in = tucker2(w, (4, 4), n_iter=5)
        >>> core.shape
        torch.Size([4, 4, 3, 3])
    """
    check_float_tensor(weight, "weight", min_ndim=2)
    if not isinstance(ranks, tuple | list) or len(ranks) != 2:
        raise ValueError(f"ranks must be a pair (r_out, r_in), got {ranks!r}")
    c_out, c_in = weight.shape[:2]
    r_out = check_rank(ranks[0], "ranks[0] (r_out)", full=c_out)
    r_in = check_rank(ranks[1], "ranks[1] (r_in)", full=c_in)
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 0:
        raise ValueError(f"n_iter must be an int >= 0, got {n_iter!r}")
    if not isinstance(tol, int | float) or tol < 0:
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    if not bool(torch.isfinite(weight).all()):
        raise DecompositionError(
            "tucker2: the kernel holds NaN or Inf values; expected finite weights; fix or "
            "re-initialise the layer before decomposing it"
        )
    w = weight.reshape(c_out, c_in, -1)  # (C_out, C_in, k)
    norm = torch.linalg.vector_norm(w)
    # Truncated HOSVD: leading left singular vectors of each channel-mode unfolding.
    u_out = leading_left_singular_vectors(unfold(w, 0), r_out)  # (C_out, r_out)
    u_in = leading_left_singular_vectors(unfold(w, 1), r_in)  # (C_in, r_in)
    previous = float("inf")
    if w.shape[2] == 1:
        # A 1x1 kernel is a matrix: the truncated HOSVD already is the best rank-(r_out, r_in)
        # approximation (the top min(r) singular triplets), so HOOI sweeps cannot improve it.
        n_iter = 0
    for it in range(n_iter):
        u_out = leading_left_singular_vectors(unfold(_project(w, u_in, 1), 0), r_out)
        u_in = leading_left_singular_vectors(unfold(_project(w, u_out, 0), 1), r_in)
        core = _project(_project(w, u_out, 0), u_in, 1)  # (r_out, r_in, k)
        # Orthonormal factors: ||W - W_hat||^2 = ||W||^2 - ||core||^2.
        gap = (norm**2 - torch.linalg.vector_norm(core) ** 2).clamp_min(0).sqrt()
        error = float(gap / norm) if bool(norm > 0) else 0.0
        if abs(previous - error) < tol:
            logger.debug("tucker2 converged after %d sweeps, relative error %.3g", it + 1, error)
            break
        previous = error
    core = _project(_project(w, u_out, 0), u_in, 1)  # (r_out, r_in, k)
    core = core.reshape(r_out, r_in, *weight.shape[2:])
    return Tucker2Factors(core, u_out, u_in)
