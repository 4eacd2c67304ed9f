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

import torch

from slimtorch.core.errors import DecompositionError
from slimtorch.decompose.linalg import (
    check_float_tensor,
    check_rank,
    leading_left_singular_vectors,
    norm64,
    unfold,
    unit_scale,
)

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
        errors: Relative error after each sweep (from the Gram matrices, see :func:`cp_als`; the
            last one from the full reconstruction).
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


def cp_to_full(weights: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """Rebuild ``sum_r w_r a_r^(0) o ... o a_r^(N-1)``.

    One matrix product: the largest mode's scaled factor times the Khatri-Rao product of the
    others (an einsum over all factors at once would materialise an ``(I_0, ..., I_N-1, R)``
    intermediate).

    Example:
        >>> cp_to_full(torch.ones(1), [torch.ones(2, 1), torch.ones(3, 1)]).shape
        torch.Size([2, 3])
    """
    sizes = [int(f.shape[0]) for f in factors]
    big = max(range(len(factors)), key=lambda n: sizes[n])
    others = [f for n, f in enumerate(factors) if n != big]
    flat = (factors[big] * weights) @ khatri_rao(others).mT  # (I_big, prod others)
    rest = [s for n, s in enumerate(sizes) if n != big]
    return flat.reshape(sizes[big], *rest).movedim(0, big)


def khatri_rao(mats: list[torch.Tensor]) -> torch.Tensor:
    """Column-wise Kronecker product ``(prod I_n, R)``, the last matrix's index running fastest.

    Row ``(i_0, ..., i_k)`` of the result is ``prod_n mats[n][i_n]``: the column order of a
    row-major reshape of a tensor whose trailing modes are those of ``mats``.

    Example:
        >>> khatri_rao([torch.ones(2, 3), torch.ones(4, 3)]).shape
        torch.Size([8, 3])
    """
    out = mats[0]
    for m in mats[1:]:
        out = (out[:, None, :] * m[None, :, :]).reshape(-1, out.shape[1])  # (rows * I_m, R)
    return out


def _contract_leading(partial: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Contract the ``I_n`` mode of an ``(R, I_n, rest)`` partial product with ``factor``.

    Returns ``(R, rest)``: term ``r`` keeps only column ``r`` of ``factor (I_n, R)``.
    """
    r, i_n = partial.shape[:2]
    flat = partial.reshape(r, i_n, -1)  # (R, I_n, rest)
    return torch.bmm(factor.mT.unsqueeze(1), flat).squeeze(1)  # (R, rest)


def _mttkrp_from_partial(
    partial: torch.Tensor, factors: list[torch.Tensor], mode: int
) -> torch.Tensor:
    """MTTKRP of ``mode`` from ``partial`` = the tensor contracted with the factors of every
    mode before ``mode``, shape ``(R, I_mode, I_mode+1 * ... )``: ``(I_mode, R)``."""
    r, i_n = partial.shape[:2]
    if mode == len(factors) - 1:
        return partial.reshape(r, i_n).mT  # (I_mode, R)
    kr = khatri_rao(factors[mode + 1 :]).mT.unsqueeze(2)  # (R, rest, 1)
    return torch.bmm(partial.reshape(r, i_n, -1), kr).squeeze(2).mT  # (I_mode, R)


def _svd_init(tensor: torch.Tensor, rank: int, gen: torch.Generator) -> list[torch.Tensor]:
    factors = []
    for mode in range(tensor.ndim):
        size = tensor.shape[mode]
        # (I_n, min(I_n, R)); a Gram eigen-decomposition for the usual wide unfolding.
        u = leading_left_singular_vectors(unfold(tensor, mode), min(size, rank))
        if u.shape[1] < rank:  # more terms than the mode's size: fill with random columns
            extra = torch.randn(u.shape[0], rank - u.shape[1], generator=gen, dtype=torch.float64)
            u = torch.cat([u, extra.to(u) / u.shape[0] ** 0.5], dim=1)
        factors.append(u)
    return factors


def init_factors(tensor: torch.Tensor, rank: int, init: str, seed: int) -> list[torch.Tensor]:
    """The starting factors of :func:`cp_als`: one ``(I_n, rank)`` per mode, unit-norm columns.

    ``init="svd"``: leading left singular vectors of each unfolding, random columns beyond the
    mode's size; ``"random"``: Gaussian columns. The random columns come from a CPU generator
    seeded with ``seed``, so every device (and every call) gets the same ones.

    Example:
        >>> [tuple(f.shape) for f in init_factors(torch.randn(4, 3, 2), 5, "svd", 0)]
        [(4, 5), (3, 5), (2, 5)]
    """
    gen = torch.Generator().manual_seed(seed)
    if init == "svd":
        factors = _svd_init(tensor, rank, gen)
    else:
        factors = [
            torch.randn(n, rank, generator=gen, dtype=torch.float64).to(tensor)
            for n in tensor.shape
        ]
    norms = [torch.linalg.vector_norm(f, dim=0).clamp_min(1e-30) for f in factors]
    return [f / n for f, n in zip(factors, norms, strict=True)]


def check_cp_options(
    n_iter: object, tol: object, init: object, reg: object, check_every: object
) -> None:
    """Validate the options of :func:`cp_als` and
    :func:`~slimtorch.decompose.cp_batched.cp_als_many` (``ValueError`` naming the bad one)."""
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"n_iter must be an int >= 1, got {n_iter!r}")
    for name, value in (("tol", tol), ("reg", reg)):
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if init not in ("svd", "random"):
        raise ValueError(f"init must be 'svd' or 'random', got {init!r}")
    if check_every is not None and (
        isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1
    ):
        raise ValueError(f"check_every must be None or an int >= 1, got {check_every!r}")


def _default_check_every(device: torch.device) -> int:
    """Sweeps between host-side convergence checks: every sweep on the CPU (a check is free
    there), every 8 on an accelerator (each check is a device-to-host synchronisation)."""
    return 1 if device.type == "cpu" else 8


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
    check_every: int | None = None,
) -> CPResult:
    """CP decomposition by ALS with proximal Tikhonov damping (Lebedev et al., 2015,
    arXiv:1412.6553).

    Each sweep solves, for every mode ``n``,
    ``A_n = (M_n + lam A_n_prev) (V_n + lam I)^-1`` where ``M_n`` is the MTTKRP, ``V_n`` the
    Hadamard product of the other factors' Gram matrices and ``lam = reg * mean(diag(V_n))``
    (scale-free). Columns are renormalised into ``weights`` after each solve.

    A sweep costs about two passes over the tensor: mode 0's MTTKRP is one matrix product with
    the Khatri-Rao product of the other factors; the tensor contracted with the new mode-0
    factor is then kept and reduced one mode at a time, so every later mode's MTTKRP comes from
    that partial product (a dimension tree; Phan, Tichavsky and Cichocki, 2013, "Fast
    alternating LS algorithms for high order CANDECOMP/PARAFAC tensor factorizations", IEEE
    Trans. Signal Process. 61(19), 4834-4846). The error of each sweep comes without a
    reconstruction, from ``||X - X_hat||^2 = ||X||^2 - 2 <X, X_hat> + ||X_hat||^2`` with
    ``<X, X_hat>`` the last MTTKRP against the last factor and ``||X_hat||^2`` from the Gram
    matrices (Kolda and Bader, 2009, "Tensor decompositions and applications", SIAM Review
    51(3)). That identity loses accuracy when the error nears ``sqrt(eps)`` of the dtype; once
    a check sees the error below ``1e3 * sqrt(eps)`` the remaining sweeps measure it from the
    reconstruction. The returned ``rel_error`` always comes from the reconstruction. ALS runs
    on the tensor divided by its :func:`~slimtorch.decompose.linalg.unit_scale` (a power of
    two) and the weights are multiplied by it at the end, so the result does not depend on the
    tensor's scale (float32 Gram matrices of weights near 1e19 overflow, near 1e-20 underflow).

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
        check_every: Sweeps between the host's reads of the errors (each read synchronises the
            device); ``None`` picks 1 on the CPU and 8 elsewhere. The result does not depend on
            it: sweeps past convergence leave the factors unchanged and are not counted.

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
    check_cp_options(n_iter, tol, init, reg, check_every)
    if not bool(torch.isfinite(tensor).all()):
        raise DecompositionError(
            "cp_als: the tensor holds NaN or Inf values; expected finite values; fix or "
            "re-initialise the layer before decomposing it"
        )
    unit = unit_scale(tensor)  # exact: ALS on tensor / unit, the weights scaled back at the end
    tensor = tensor / unit
    factors = init_factors(tensor, rank, init, seed)
    weights = torch.ones(rank, dtype=tensor.dtype, device=tensor.device)
    if not bool((tensor != 0).any()):  # the zero tensor (a norm of tiny values could underflow)
        zeros = torch.zeros_like(weights)
        return CPResult(zeros, factors, 0, 0.0, True, [0.0])
    norm_x64 = norm64(tensor)
    norm_x = norm_x64.to(tensor.dtype)
    ndim, device = tensor.ndim, tensor.device
    every = _default_check_every(device) if check_every is None else check_every
    exact_below = 1e3 * torch.finfo(tensor.dtype).eps ** 0.5
    exact = False  # measure each sweep's error from the reconstruction
    x0 = tensor.reshape(tensor.shape[0], -1)  # (I_0, prod others), a view
    eye = torch.eye(rank, dtype=tensor.dtype, device=device)
    grams = [f.mT @ f for f in factors]  # each (R, R)
    done = torch.zeros((), dtype=torch.bool, device=device)  # converged on the device
    last_error = torch.full((), float("inf"), dtype=torch.float64, device=device)
    pending: list[torch.Tensor] = []  # (error, ok) of the sweeps the host has not read yet
    errors: list[float] = []
    converged = False
    it = 0
    for it in range(1, n_iter + 1):
        kept = (list(factors), list(grams), weights)
        singular = torch.zeros((), dtype=torch.bool, device=device)
        partial = x0  # the tensor contracted with the factors of the modes already updated
        for mode in range(ndim):
            v = torch.ones_like(eye)
            for n, g in enumerate(grams):
                if n != mode:
                    v = v * g  # (R, R)
            if mode == 0:
                m = x0 @ khatri_rao(factors[1:])  # (I_0, R)
            else:
                m = _mttkrp_from_partial(partial, factors, mode)  # (I_n, R)
            lam = reg * torch.diagonal(v).mean()
            previous = factors[mode] * weights  # (I_n, R), the unnormalised previous factor
            rhs = (m + lam * previous).mT  # (R, I_n)
            # No host sync here: a failed factorisation is read with the errors, below.
            chol, info = torch.linalg.cholesky_ex(v + lam * eye)
            singular = singular | (info != 0)
            new = torch.cholesky_solve(rhs, chol).mT  # (I_n, R)
            weights = torch.linalg.vector_norm(new, dim=0)
            factors[mode] = new / weights.clamp_min(1e-30)
            grams[mode] = factors[mode].mT @ factors[mode]
            if mode == 0:
                partial = (factors[0].mT @ x0).reshape(rank, *tensor.shape[1:])  # (R, I_1, ...)
            elif mode < ndim - 1:
                partial = _contract_leading(partial, factors[mode])  # (R, I_n+1 * ...)
                partial = partial.reshape(rank, *tensor.shape[mode + 1 :])
        if exact:
            full = cp_to_full(weights, factors)
            error_t = norm64(full - tensor) / norm_x64
        else:
            # <X, X_hat> = sum(M_last * A_last * w); ||X_hat||^2 = w^T (V_last * G_last) w.
            inner = (m.double() * new.double()).sum()
            w64 = weights.double()
            hat2 = w64 @ (v * grams[-1]).double() @ w64
            error_t = (norm_x64**2 - 2 * inner + hat2).clamp_min(0).sqrt() / norm_x64
        ok = torch.isfinite(weights).all() & ~singular
        if every > 1:
            # Sweeps after convergence (run before the host reads it) change nothing.
            factors = [torch.where(done, a, b) for a, b in zip(kept[0], factors, strict=True)]
            grams = [torch.where(done, a, b) for a, b in zip(kept[1], grams, strict=True)]
            weights = torch.where(done, kept[2], weights)
            ok = ok | done
            stalled = (error_t < tol) | ((last_error - error_t).abs() < tol)
            # below exact_below the identity's error is noise: no convergence until measured
            done = done | (stalled & (exact or error_t >= exact_below))
            last_error = error_t
        pending.append(torch.stack([error_t, ok.double()]))
        if it % every and it < n_iter:
            continue
        rows = torch.stack(pending).tolist()  # one sync every `every` sweeps
        first = it - len(rows) + 1
        pending = []
        for sweep, (error, good) in enumerate(rows, start=first):
            if error != error or not good:
                raise DecompositionError(
                    f"cp_als: NaN/Inf or a singular normal matrix after {sweep} sweeps at rank "
                    f"{rank}; expected finite factors; raise reg (e.g. 1e-2) or lower the rank"
                )
            errors.append(error)
            flat = error < tol or (len(errors) > 1 and abs(errors[-2] - error) < tol)
            if flat and (exact or error >= exact_below):
                converged, it = True, sweep
                break
        if converged:
            break
        exact = exact or errors[-1] < exact_below
    rel_error = float(norm64(cp_to_full(weights, factors) - tensor) / norm_x)
    errors[-1] = rel_error
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
    return CPResult(weights * unit, factors, it, rel_error, converged, errors)
