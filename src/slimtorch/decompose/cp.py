"""CP (CANDECOMP/PARAFAC) decomposition by regularised alternating least squares.

``X ~= sum_r w_r a_r^(0) o a_r^(1) o ... o a_r^(N-1)``. For a conv kernel ``(C_out, C_in, kh, kw)``
the four factors become a 1x1 conv, two depthwise spatial convs and a 1x1 conv (Lebedev et al.,
2015, "Speeding-up convolutional neural networks using fine-tuned CP-decomposition",
arXiv:1412.6553). Plain ALS on 4-D kernels tends to degenerate (two or more rank-1 terms grow
without bound while cancelling each other); Lebedev et al. note it and use a damped solver. Here
each least-squares solve carries a proximal Tikhonov term ``lambda ||A - A_prev||^2`` (Navasca,
De Lathauwer and Kindermann, 2008, "Swamp reducing technique for tensor decomposition", EUSIPCO),
which damps the steps that feed degeneracy yet leaves the fixed points (and so exact
decompositions) unchanged.

Example:
    >>> a, b, c = (torch.randn(n, 3, dtype=torch.float64) for n in (6, 5, 4))
    >>> x = torch.einsum("ir,jr,kr->ijk", a, b, c)
    >>> result = cp_als(x, 3, n_iter=500, tol=1e-12)
    >>> float(result.rel_error) < 1e-6
    True
"""

from __future__ import annotations

import dataclasses
import logging
import string

import torch

from slimtorch.core.errors import DecompositionError
from slimtorch.decompose.linalg import check_float_tensor, check_rank, unfold

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CPResult:
    """A CP decomposition and how the ALS run went.

    Attributes:
        weights: ``(R,)`` scale of each rank-1 term.
        factors: One ``(I_n, R)`` factor per mode, unit-norm columns.
        iterations: ALS sweeps run.
        rel_error: Final ``||X - X_hat|| / ||X||`` (computed from the full reconstruction).
        converged: Whether the error change fell below ``tol`` within ``n_iter`` sweeps.
        errors: Relative error after each sweep.
    """

    weights: torch.Tensor
    factors: list[torch.Tensor]
    iterations: int
    rel_error: float
    converged: bool
    errors: list[float]

    def to_full(self) -> torch.Tensor:
        """The reconstructed tensor."""
        return cp_to_full(self.weights, self.factors)


def _letters(ndim: int) -> str:
    return string.ascii_lowercase[:ndim]


def cp_to_full(weights: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """Rebuild ``sum_r w_r a_r^(0) o ... o a_r^(N-1)``.

    Example:
        >>> cp_to_full(torch.ones(1), [torch.ones(2, 1), torch.ones(3, 1)]).shape
        torch.Size([2, 3])
    """
    idx = _letters(len(factors))
    eq = ",".join(f"{c}z" for c in idx) + ",z->" + idx
    return torch.einsum(eq, *factors, weights)


def _mttkrp(tensor: torch.Tensor, factors: list[torch.Tensor], mode: int) -> torch.Tensor:
    """Matricised tensor times Khatri-Rao product of every factor but ``mode``: ``(I_mode, R)``."""
    idx = _letters(tensor.ndim)
    others = [n for n in range(tensor.ndim) if n != mode]
    eq = idx + "," + ",".join(f"{idx[n]}z" for n in others) + f"->{idx[mode]}z"
    return torch.einsum(eq, tensor, *(factors[n] for n in others))


def _svd_init(tensor: torch.Tensor, rank: int, gen: torch.Generator) -> list[torch.Tensor]:
    factors = []
    for mode in range(tensor.ndim):
        u, _, _ = torch.linalg.svd(unfold(tensor, mode), full_matrices=False)
        u = u[:, :rank]  # (I_n, min(I_n, R))
        if u.shape[1] < rank:  # more terms than the mode's size: fill with random columns
            extra = torch.randn(u.shape[0], rank - u.shape[1], generator=gen, dtype=torch.float64)
            u = torch.cat([u, extra.to(u) / u.shape[0] ** 0.5], dim=1)
        factors.append(u)
    return factors


def cp_als(
    tensor: torch.Tensor,
    rank: int,
    *,
    n_iter: int = 500,
    tol: float = 1e-7,
    init: str = "svd",
    reg: float = 1e-3,
    seed: int = 0,
    require_convergence: bool = True,
) -> CPResult:
    """CP decomposition by ALS with proximal Tikhonov damping (Lebedev et al., 2015,
    arXiv:1412.6553).

    Each sweep solves, for every mode ``n``,
    ``A_n = (M_n + lam A_n_prev) (V_n + lam I)^-1`` where ``M_n`` is the MTTKRP, ``V_n`` the
    Hadamard product of the other factors' Gram matrices and ``lam = reg * mean(diag(V_n))``
    (scale-free). Columns are renormalised into ``weights`` after each solve.

    Args:
        tensor: 3-D or higher float32/float64 tensor on any device.
        rank: Number of rank-1 terms ``R >= 1``.
        n_iter: Maximum ALS sweeps ``>= 1``.
        tol: Converged when the relative error changes by less than ``tol`` between sweeps (or
            falls below ``tol``).
        init: ``"svd"`` (leading singular vectors of each unfolding, random columns beyond the
            mode's size) or ``"random"``.
        reg: Proximal Tikhonov strength ``>= 0`` relative to the Gram diagonal (0: plain ALS).
        seed: Seed of the random columns (drawn on the CPU, so every device gets the same ones).
        require_convergence: Raise when ``tol`` is not reached within ``n_iter`` sweeps; when
            False return the result with ``converged=False`` and log a warning.

    Returns:
        A :class:`CPResult` on the input's device and dtype.

    Raises:
        TypeError, ValueError: bad arguments (named in the message).
        DecompositionError: NaN/Inf input, a run that produced NaN/Inf or diverged, or (with
            ``require_convergence``) one that did not converge.

    Example:
        >>> res = cp_als(torch.randn(4, 3, 3, 3, dtype=torch.float64), 4, n_iter=50,
        ...              require_convergence=False)
        >>> [f.shape[1] for f in res.factors]
        [4, 4, 4, 4]
    """
    check_float_tensor(tensor, "tensor", min_ndim=3)
    check_rank(rank, "rank")
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"n_iter must be an int >= 1, got {n_iter!r}")
    for name, value in (("tol", tol), ("reg", reg)):
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if init not in ("svd", "random"):
        raise ValueError(f"init must be 'svd' or 'random', got {init!r}")
    if not bool(torch.isfinite(tensor).all()):
        raise DecompositionError(
            "cp_als: the tensor holds NaN or Inf values; expected finite values; fix or "
            "re-initialise the layer before decomposing it"
        )
    gen = torch.Generator().manual_seed(seed)
    if init == "svd":
        factors = _svd_init(tensor, rank, gen)
    else:
        factors = [
            torch.randn(n, rank, generator=gen, dtype=torch.float64).to(tensor)
            for n in tensor.shape
        ]
    norms = [torch.linalg.vector_norm(f, dim=0).clamp_min(1e-30) for f in factors]
    factors = [f / n for f, n in zip(factors, norms, strict=True)]
    weights = torch.ones(rank, dtype=tensor.dtype, device=tensor.device)
    norm_x = torch.linalg.vector_norm(tensor)
    if not bool(norm_x > 0):
        zeros = torch.zeros_like(weights)
        return CPResult(zeros, factors, 0, 0.0, True, [0.0])
    eye = torch.eye(rank, dtype=tensor.dtype, device=tensor.device)
    grams = [f.mT @ f for f in factors]  # each (R, R)
    errors: list[float] = []
    converged = False
    it = 0
    for it in range(1, n_iter + 1):
        singular = torch.zeros((), dtype=torch.bool, device=tensor.device)
        for mode in range(tensor.ndim):
            v = torch.ones_like(eye)
            for n, g in enumerate(grams):
                if n != mode:
                    v = v * g  # (R, R)
            m = _mttkrp(tensor, factors, mode)  # (I_n, R)
            lam = reg * torch.diagonal(v).mean()
            previous = factors[mode] * weights  # (I_n, R), the unnormalised previous factor
            rhs = (m + lam * previous).mT  # (R, I_n)
            # No host sync here: a failed factorisation is checked once per sweep, below.
            chol, info = torch.linalg.cholesky_ex(v + lam * eye)
            singular = singular | (info != 0)
            new = torch.cholesky_solve(rhs, chol).mT  # (I_n, R)
            weights = torch.linalg.vector_norm(new, dim=0)
            factors[mode] = new / weights.clamp_min(1e-30)
            grams[mode] = factors[mode].mT @ factors[mode]
        # The full reconstruction is as cheap as one MTTKRP and exact down to rounding.
        error_t = torch.linalg.vector_norm(cp_to_full(weights, factors) - tensor) / norm_x
        finite = torch.isfinite(weights).all() & ~singular
        error, ok = torch.stack([error_t.double(), finite.double()]).tolist()  # one sync a sweep
        if error != error or not ok:
            raise DecompositionError(
                f"cp_als: NaN/Inf or a singular normal matrix after {it} sweeps at rank {rank}; "
                "expected finite factors; "
                "raise reg (e.g. 1e-2) or lower the rank"
            )
        errors.append(error)
        if error < tol or (len(errors) > 1 and abs(errors[-2] - error) < tol):
            converged = True
            break
    rel_error = errors[-1]
    if rel_error != rel_error or rel_error > 1.0 + 1e-6:
        raise DecompositionError(
            f"cp_als diverged at rank {rank}: relative error {rel_error:.3g} after {it} sweeps "
            "(expected < 1, the error of the zero tensor); raise reg or lower the rank"
        )
    if not converged:
        msg = (
            f"cp_als did not converge at rank {rank}: error change still >= tol={tol:g} after "
            f"{it} sweeps (relative error {rel_error:.4g})"
        )
        if require_convergence:
            raise DecompositionError(msg + "; raise n_iter or tol, or lower the rank")
        logger.warning("%s; returning the last iterate", msg)
    return CPResult(weights, factors, it, rel_error, converged, errors)
