"""Empirical variational Bayesian matrix factorisation (EVBMF): a rank estimate for a matrix.

Nakajima, Sugiyama, Babacan and Tomioka, 2013, "Global analytic solution of fully-observed
variational Bayesian matrix factorization", JMLR 14, give the VB posterior of a low-rank matrix
factorisation in closed form: a singular value survives only above a threshold that depends on the
noise variance ``sigma^2``; with the priors estimated from the data (empirical Bayes) the
threshold is ``sqrt(M sigma^2 (1 + tau)(1 + alpha / tau))`` with ``alpha = L / M`` and
``tau = 2.5129 sqrt(alpha)``. When ``sigma^2`` is unknown it is chosen to minimise the free
energy, a one-dimensional problem over a bracket that the paper derives. Kim et al. (2016,
arXiv:1511.06530) pick Tucker ranks with it, one mode unfolding at a time.

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> y = torch.randn(40, 5, generator=g) @ torch.randn(5, 60, generator=g)
    >>> evbmf(y + 0.1 * torch.randn(40, 60, generator=g)).rank
    5
"""

from __future__ import annotations

import dataclasses
import math

import torch

from slimtorch.decompose.linalg import check_float_tensor

_TAU_FACTOR = 2.5129  # tau_bar = 2.5129 sqrt(alpha): the EVBMF threshold constant


@dataclasses.dataclass(frozen=True)
class EVBMFResult:
    """What EVBMF found.

    Attributes:
        rank: Number of singular values above the EVBMF threshold.
        sigma2: Noise variance used (given or estimated).
        threshold: The singular-value threshold.
    """

    rank: int
    sigma2: float
    threshold: float


def _tau(x: torch.Tensor, alpha: float) -> torch.Tensor:
    b = x - (1 + alpha)
    return 0.5 * (b + torch.sqrt((b * b - 4 * alpha).clamp_min(0)))


def _free_energy(
    sigma2: float, s2: torch.Tensor, big_l: int, big_m: int, residual: float, x_bar: float
) -> float:
    """Free energy (up to constants, scaled by 2/M) of EVBMF as a function of ``sigma^2``."""
    alpha = big_l / big_m
    x = s2 / (big_m * sigma2)
    on, off = x[x > x_bar], x[x <= x_bar]
    tau = _tau(on, alpha)
    value = (off - torch.log(off)).sum()
    value = value + (on - tau).sum() + torch.log((tau + 1) / on).sum()
    value = value + alpha * torch.log(tau / alpha + 1).sum()
    value = value + residual / (big_m * sigma2) + (big_l - s2.numel()) * math.log(sigma2)
    return float(value)


def _minimise(f: object, low: float, high: float, n_grid: int = 64, n_golden: int = 60) -> float:
    """Minimise ``f`` over ``[low, high]`` on a log scale: a grid, then a golden-section search."""
    assert callable(f)
    lo, hi = math.log(low), math.log(high)
    grid = [lo + (hi - lo) * i / (n_grid - 1) for i in range(n_grid)]
    values = [f(math.exp(g)) for g in grid]
    best = min(range(n_grid), key=values.__getitem__)
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, n_grid - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(math.exp(c)), f(math.exp(d))
    for _ in range(n_golden):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(math.exp(d))
    candidates = [(values[best], grid[best]), (fc, c), (fd, d)]
    return math.exp(min(candidates)[1])


def evbmf(matrix: torch.Tensor, sigma2: float | None = None) -> EVBMFResult:
    """Rank of ``matrix`` by the analytic EVBMF solution (Nakajima et al., 2013, JMLR 14).

    Args:
        matrix: A 2-D float tensor ``(L, M)`` on any device (the maths runs in float64 on the
            CPU on its singular values only).
        sigma2: The noise variance if known; ``None`` estimates it by minimising the free energy.

    Returns:
        An :class:`EVBMFResult` with the rank (possibly 0 for pure noise), ``sigma2`` and the
        singular-value threshold.

    Raises:
        TypeError, ValueError: ``matrix`` is not a 2-D float tensor or ``sigma2 <= 0``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.randn(30, 3, generator=g) @ torch.randn(3, 50, generator=g)
        >>> evbmf(y + 0.05 * torch.randn(30, 50, generator=g)).rank
        3
    """
    check_float_tensor(matrix, "matrix", min_ndim=2)
    if matrix.ndim != 2:
        raise ValueError(f"matrix must be 2-D, got shape {tuple(matrix.shape)}")
    if sigma2 is not None and (
        isinstance(sigma2, bool) or not isinstance(sigma2, int | float) or sigma2 <= 0
    ):
        raise ValueError(f"sigma2 must be a number > 0 or None, got {sigma2!r}")
    y = matrix.detach().to("cpu", torch.float64)
    if y.shape[0] > y.shape[1]:
        y = y.mT  # (L, M) with L <= M
    big_l, big_m = y.shape
    s = torch.linalg.svdvals(y)  # (L,), descending
    s2 = s**2
    alpha = big_l / big_m
    tau_bar = _TAU_FACTOR * math.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    residual = max(float((y**2).sum() - s2.sum()), 0.0)  # 0 for a full SVD
    if sigma2 is None:
        h = s.numel()
        upper = (float(s2.sum()) + residual) / (big_l * big_m)
        # Bracket of the paper: components beyond index eh_ub are noise for any sigma^2.
        eh_ub = min(math.ceil(big_l / (1 + alpha)) - 1, h) - 1
        tail = s2[eh_ub + 1 :] if eh_ub + 1 < h else s2[-1:]
        lower = max(float(s2[min(eh_ub + 1, h - 1)]) / (big_m * x_bar), float(tail.mean()) / big_m)
        if not upper > 0:
            return EVBMFResult(0, 0.0, 0.0)
        lower = min(max(lower, upper * 1e-12), upper)
        if lower >= upper:
            sigma2 = upper
        else:
            sigma2 = _minimise(
                lambda v: _free_energy(v, s2, big_l, big_m, residual, x_bar), lower, upper
            )
    threshold = math.sqrt(big_m * sigma2 * x_bar)
    rank = int((s > threshold).sum())
    return EVBMFResult(rank, float(sigma2), threshold)
