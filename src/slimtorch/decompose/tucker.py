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
    leading_singular_subspaces,
    sym_eigh,
    unit_scale,
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


def _leading_with_energy(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Leading ``rank`` left singular vectors of ``matrix`` and the energy they capture,
    ``||U^T M||_F^2`` (the sum of the top eigenvalues of ``M M^T`` on the Gram path)."""
    rows, cols = matrix.shape
    if 2 * rows <= cols:
        vals, vecs = sym_eigh(matrix @ matrix.mT)  # (rows, rows), ascending
        return vecs[:, -rank:].flip(-1), vals[-rank:].sum()
    u = leading_left_singular_vectors(matrix, rank)
    return u, (u.mT @ matrix).square().sum()


def _default_check_every(device: torch.device) -> int:
    """Sweeps between host-side convergence checks: every sweep on the CPU, every 4 elsewhere."""
    return 1 if device.type == "cpu" else 4


def check_hooi_options(n_iter: object, tol: object, check_every: object) -> None:
    """Validate HOOI's sweep cap, tolerance and host-check interval (``ValueError`` if bad)."""
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 0:
        raise ValueError(f"n_iter must be an int >= 0, got {n_iter!r}")
    if not isinstance(tol, int | float) or tol < 0:
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    if check_every is not None and (
        isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1
    ):
        raise ValueError(f"check_every must be None or an int >= 1, got {check_every!r}")


def tucker2(
    weight: torch.Tensor,
    ranks: tuple[int, int],
    *,
    n_iter: int = 25,
    tol: float = 1e-7,
    check_every: int | None = None,
) -> Tucker2Factors:
    """Tucker-2 of a kernel by HOSVD initialisation and HOOI (Kim et al., 2016, arXiv:1511.06530).

    Each HOOI sweep projects the kernel on the current input (output) factor and takes the
    leading left singular vectors of the projected mode unfolding, through the eigenvectors of
    its small Gram matrix. Iterations stop when the relative reconstruction error changes by less
    than ``tol``, or after ``n_iter`` sweeps (``n_iter=0`` returns the truncated HOSVD).

    The kernel is laid out once as two matrices, ``(C_out * k, C_in)`` and ``(C_in * k, C_out)``,
    so each projection is one matrix product; the first sweep's output factor depends only on the
    input factor, so the HOSVD output factor is computed only when ``n_iter=0``. A 1x1 kernel is
    a matrix, whose truncated HOSVD already is the best rank-``(r_out, r_in)`` approximation: it
    takes one Gram eigen-decomposition and a QR (no sweeps). The kernel is divided by its
    :func:`~slimtorch.decompose.linalg.unit_scale` (a power of two) before and the core
    multiplied by it after, so the factors do not depend on the kernel's scale: its Gram
    matrices would overflow float32 for weights near 1e19 and underflow it near 1e-20.

    Args:
        weight: Kernel of shape ``(C_out, C_in, *spatial)`` (2-D and higher), float32/float64,
            any device.
        ranks: ``(r_out, r_in)`` with ``1 <= r_out <= C_out`` and ``1 <= r_in <= C_in``.
        n_iter: Maximum number of HOOI sweeps, ``>= 0``.
        tol: Stop when the relative error changes by less than this between sweeps.
        check_every: Sweeps between the host's reads of the error (each read synchronises the
            device); ``None`` picks 1 on the CPU and 4 elsewhere. The result does not depend on
            it: sweeps past convergence leave the factors unchanged.

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
    check_hooi_options(n_iter, tol, check_every)
    if not bool(torch.isfinite(weight).all()):
        raise DecompositionError(
            "tucker2: the kernel holds NaN or Inf values; expected finite weights; fix or "
            "re-initialise the layer before decomposing it"
        )
    spatial = weight.shape[2:]
    unit = unit_scale(weight)  # exact: factorise weight / unit, then scale the core back
    w = (weight / unit).reshape(c_out, c_in, -1)  # (C_out, C_in, k)
    k = w.shape[2]
    if k == 1:
        u_out, u_in = leading_singular_subspaces(w[:, :, 0], r_out, r_in)
        core = u_out.mT @ w[:, :, 0] @ u_in * unit  # (r_out, r_in)
        return Tucker2Factors(core.reshape(r_out, r_in, *spatial), u_out, u_in)
    w_out = w.transpose(1, 2).reshape(c_out * k, c_in)  # (C_out * k, C_in), rows (o, k)
    w_in = w.permute(1, 2, 0).reshape(c_in * k, c_out)  # (C_in * k, C_out), rows (i, k)
    # Truncated HOSVD: leading left singular vectors of each channel-mode unfolding (any column
    # order of an unfolding gives the same singular vectors).
    u_in = leading_left_singular_vectors(w_in.reshape(c_in, k * c_out), r_in)  # (C_in, r_in)
    if n_iter == 0:
        u_out = leading_left_singular_vectors(w_out.reshape(c_out, k * c_in), r_out)
    else:
        every = _default_check_every(weight.device) if check_every is None else check_every
        norm2 = w.square().sum()
        norm = norm2.sqrt()
        scale = torch.where(norm > 0, norm, torch.ones_like(norm))
        done = torch.zeros((), dtype=torch.bool, device=weight.device)
        last = torch.full((), float("inf"), dtype=weight.dtype, device=weight.device)
        pending: list[torch.Tensor] = []
        errors: list[float] = []
        for it in range(1, n_iter + 1):
            kept = (u_out, u_in) if it > 1 else None
            y_out = (w_out @ u_in).reshape(c_out, k * r_in)  # (C_out, k * r_in)
            u_out = leading_left_singular_vectors(y_out, r_out)  # (C_out, r_out)
            y_in = (w_in @ u_out).reshape(c_in, k * r_out)  # (C_in, k * r_out)
            u_in, core2 = _leading_with_energy(y_in, r_in)  # (C_in, r_in), ||core||^2
            # Orthonormal factors: ||W - W_hat||^2 = ||W||^2 - ||core||^2.
            error = (norm2 - core2).clamp_min(0).sqrt() / scale
            if every > 1:
                if kept is not None:  # sweeps after convergence change nothing
                    u_out = torch.where(done, kept[0], u_out)
                    u_in = torch.where(done, kept[1], u_in)
                done = done | ((last - error).abs() < tol)
                last = error
            pending.append(error)
            if it % every and it < n_iter:
                continue
            values = torch.stack(pending).tolist()  # one sync every `every` sweeps
            pending = []
            stop = False
            for value in values:
                if errors and abs(errors[-1] - value) < tol:
                    stop = True
                    break
                errors.append(value)
            if stop:
                logger.debug("tucker2 converged after %d sweeps", len(errors) + 1)
                break
    y_in = (w_in @ u_out).reshape(c_in, k, r_out)  # (C_in, k, r_out)
    core = torch.einsum("ib,ika->abk", u_in, y_in) * unit  # (r_out, r_in, k)
    return Tucker2Factors(core.reshape(r_out, r_in, *spatial), u_out, u_in)
