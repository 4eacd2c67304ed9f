"""CP decomposition of many tensors at once: same-shape tensors share batched ALS sweeps.

:func:`cp_als_many` runs the algorithm of :func:`~slimtorch.decompose.cp.cp_als` (regularised
CP-ALS for conv kernels, Lebedev et al., 2015, arXiv:1412.6553; proximal Tikhonov damping,
Navasca, De Lathauwer and Kindermann, 2008, "Swamp reducing technique for tensor
decomposition", EUSIPCO; dimension-tree MTTKRP, Phan, Tichavsky and Cichocki, 2013, IEEE Trans.
Signal Process. 61(19); errors from the Gram matrices, Kolda and Bader, 2009, SIAM Review 51(3))
on a whole model's kernels. Tensors of one shape, rank, dtype and device are stacked, and every
step of a sweep (Khatri-Rao products, MTTKRPs, Gram matrices, Cholesky solves) is one batched
call for the whole stack. A sweep of a small kernel is a hundred or so short device calls, so
on a GPU, where such calls are bound by launch latency, a stack of ``B`` kernels should cost
little more than one (ResNet-50's sixteen 3x3 kernels fall into four shape groups).

Example:
    >>> ws = [torch.randn(8, 6, 3, 3, dtype=torch.float64) for _ in range(3)]
    >>> out = cp_als_many(ws, [4, 4, 2], n_iter=30, require_convergence=False)
    >>> [tuple(f.shape) for f in out[2].factors]
    [(8, 2), (6, 2), (3, 2), (3, 2)]
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from slimtorch.core.errors import DecompositionError
from slimtorch.decompose.cp import (
    CPResult,
    _default_check_every,
    check_cp_options,
    init_factors,
)
from slimtorch.decompose.linalg import (
    check_each,
    check_float_tensor,
    check_rank,
    stack_groups,
    unit_scale,
)

logger = logging.getLogger(__name__)


def _khatri_rao(mats: list[torch.Tensor]) -> torch.Tensor:
    """Batched :func:`~slimtorch.decompose.cp.khatri_rao`: ``(B, I_n, R)`` each, gives
    ``(B, prod I_n, R)``, the last matrix's index running fastest."""
    out = mats[0]
    for m in mats[1:]:
        rows = out[:, :, None, :] * m[:, None, :, :]  # (B, rows, I_m, R)
        out = rows.reshape(out.shape[0], -1, out.shape[2])  # (B, rows * I_m, R)
    return out


def _cp_to_full(weights: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """Batched :func:`~slimtorch.decompose.cp.cp_to_full`: weights ``(B, R)``, factors
    ``(B, I_n, R)``; returns ``(B, I_0, ..., I_N-1)``."""
    batch = int(weights.shape[0])
    sizes = [int(f.shape[1]) for f in factors]
    big = max(range(len(factors)), key=lambda n: sizes[n])
    others = [f for n, f in enumerate(factors) if n != big]
    flat = (factors[big] * weights[:, None, :]) @ _khatri_rao(others).mT  # (B, I_big, rest)
    rest = [s for n, s in enumerate(sizes) if n != big]
    return flat.reshape(batch, sizes[big], *rest).movedim(1, big + 1)


def _contract_leading(partial: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Contract the ``I_n`` mode of ``partial`` ``(B, R, I_n, ...)`` with ``factor``
    ``(B, I_n, R)``: ``(B, R, rest)``, term ``r`` keeping only column ``r`` of the factor."""
    batch, r, i_n = partial.shape[:3]
    flat = partial.reshape(batch * r, i_n, -1)  # (B * R, I_n, rest)
    row = factor.mT.reshape(batch * r, 1, i_n)  # (B * R, 1, I_n)
    return torch.bmm(row, flat).reshape(batch, r, -1)  # (B, R, rest)


def _mttkrp_from_partial(
    partial: torch.Tensor, factors: list[torch.Tensor], mode: int
) -> torch.Tensor:
    """Batched MTTKRP of ``mode`` from ``partial`` ``(B, R, I_mode, ...)``, the tensors
    contracted with the factors of every earlier mode: ``(B, I_mode, R)``."""
    batch, r, i_n = partial.shape[:3]
    if mode == len(factors) - 1:
        return partial.reshape(batch, r, i_n).mT  # (B, I_mode, R)
    kr = _khatri_rao(factors[mode + 1 :]).mT.reshape(batch * r, -1, 1)  # (B * R, rest, 1)
    flat = partial.reshape(batch * r, i_n, -1)  # (B * R, I_mode, rest)
    return torch.bmm(flat, kr).reshape(batch, r, i_n).mT  # (B, I_mode, R)


def _check_item(i: int, tensor: torch.Tensor, rank: object) -> int:
    check_float_tensor(tensor, f"tensors[{i}]", min_ndim=3)
    return check_rank(rank, f"ranks[{i}]")


_State = tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]


def _use_cuda_graph(device: torch.device, requested: bool | None) -> bool:
    """Graphs by default on NVIDIA CUDA devices; ``requested`` forces the choice."""
    if requested is not None:
        return bool(requested) and device.type == "cuda"
    return device.type == "cuda" and torch.version.cuda is not None


def _cp_stack(
    x: torch.Tensor,
    factors: list[torch.Tensor],
    idx: list[int],
    *,
    n_iter: int,
    tol: float,
    reg: float,
    every: int,
    graph: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor], list[list[float]], list[int | None]]:
    """Regularised ALS on a stack ``x`` ``(B, I_0, ..., I_N-1)`` of nonzero, finite tensors.

    ``factors`` are the starting ``(B, I_n, R)`` factors (unit-norm columns), ``idx`` the input
    index of each item (for messages). Returns the final weights ``(B, R)`` and factors, each
    item's errors per sweep and the sweep it converged at (``None``: not within ``n_iter``);
    raises :class:`DecompositionError` naming the items that produced NaN/Inf.

    With ``graph`` (CUDA only) one sweep is captured as a CUDA graph and replayed: a sweep is
    about two hundred short kernels, whose launches cost far more host time than the GPU spends
    on them. Inside the graph the Cholesky factorisation and solve run per item (the batched
    solvers are not capturable), and the exact error is computed every sweep and selected per
    item, so the host never changes the captured work.
    """
    batch, rank = int(x.shape[0]), int(factors[0].shape[2])
    shape, ndim, device = tuple(x.shape[1:]), x.ndim - 1, x.device
    exact_below = 1e3 * torch.finfo(x.dtype).eps ** 0.5
    exact = [False] * batch  # measure the item's error from the reconstruction
    exact_mask = torch.zeros(batch, dtype=torch.bool, device=device)  # (B,) device copy
    any_exact = False
    norm_x64 = torch.linalg.vector_norm(x.reshape(batch, -1), dim=1).double()  # (B,)
    x0 = x.reshape(batch, shape[0], -1)  # (B, I_0, prod others), a view
    eye = torch.eye(rank, dtype=x.dtype, device=device)

    def solve(v: torch.Tensor, rhs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(v^-1 rhs, failed)`` for SPD ``v`` (B, R, R) and ``rhs`` (B, R, I_n)."""
        if not graph:
            chol, info = torch.linalg.cholesky_ex(v)  # (B, R, R), (B,)
            return torch.cholesky_solve(rhs, chol), info != 0
        outs, infos = [], []
        for b in range(batch):
            chol, info = torch.linalg.cholesky_ex(v[b])  # (R, R), ()
            outs.append(torch.cholesky_solve(rhs[b], chol))  # (R, I_n)
            infos.append(info)
        return torch.stack(outs), torch.stack(infos) != 0

    def sweep(state: _State, exact_on: bool) -> tuple[_State, torch.Tensor]:
        """One ALS sweep from ``state``; returns the new state and ``(2, B)`` (error, ok)."""
        factors, grams, weights, done, last_error = list(state[0]), list(state[1]), *state[2:]
        kept = (list(factors), list(grams), weights)
        singular = torch.zeros(batch, dtype=torch.bool, device=device)
        partial = x0  # the tensors contracted with the factors of the modes already updated
        for mode in range(ndim):
            v = torch.ones_like(grams[0])
            for n, g in enumerate(grams):
                if n != mode:
                    v = v * g  # (B, R, R)
            if mode == 0:
                m = x0 @ _khatri_rao(factors[1:])  # (B, I_0, R)
            else:
                m = _mttkrp_from_partial(partial, factors, mode)  # (B, I_n, R)
            lam = reg * torch.diagonal(v, dim1=1, dim2=2).mean(1)[:, None, None]  # (B, 1, 1)
            previous = factors[mode] * weights[:, None, :]  # (B, I_n, R), unnormalised
            rhs = (m + lam * previous).mT  # (B, R, I_n)
            # No host sync here: a failed factorisation is read with the errors.
            solved, failed = solve(v + lam * eye, rhs)  # (B, R, I_n), (B,)
            singular = singular | failed
            new = solved.mT  # (B, I_n, R)
            weights = torch.linalg.vector_norm(new, dim=1)  # (B, R)
            factors[mode] = new / weights.clamp_min(1e-30)[:, None, :]
            grams[mode] = factors[mode].mT @ factors[mode]  # (B, R, R)
            if mode == 0:
                partial = (factors[0].mT @ x0).reshape(batch, rank, *shape[1:])  # (B, R, I_1..)
            elif mode < ndim - 1:
                partial = _contract_leading(partial, factors[mode])  # (B, R, rest)
                partial = partial.reshape(batch, rank, *shape[mode + 1 :])
        # <X, X_hat> = sum(M_last * A_last * w); ||X_hat||^2 = w^T (V_last * G_last) w.
        inner = (m.double() * new.double()).sum((1, 2))  # (B,)
        w64 = weights.double()[:, None, :]  # (B, 1, R)
        hat2 = (w64 @ (v * grams[-1]).double() @ w64.mT).reshape(batch)  # (B,)
        error_t = (norm_x64**2 - 2 * inner + hat2).clamp_min(0).sqrt() / norm_x64  # (B,)
        if exact_on:
            full = _cp_to_full(weights, factors)  # (B, I_0, ..., I_N-1)
            exact_t = torch.linalg.vector_norm((full - x).reshape(batch, -1), dim=1).double()
            error_t = torch.where(exact_mask, exact_t / norm_x64, error_t)
        ok = torch.isfinite(weights).all(1) & ~singular  # (B,)
        # Items converged in an earlier sweep keep their factors: later sweeps change nothing.
        frozen = done[:, None, None]  # (B, 1, 1)
        factors = [torch.where(frozen, a, b) for a, b in zip(kept[0], factors, strict=True)]
        grams = [torch.where(frozen, a, b) for a, b in zip(kept[1], grams, strict=True)]
        weights = torch.where(done[:, None], kept[2], weights)
        ok = ok | done
        # below exact_below the identity's error is noise: no convergence until measured
        trusted = exact_mask | (error_t >= exact_below)
        done = done | (trusted & ((error_t < tol) | ((last_error - error_t).abs() < tol)))
        return (factors, grams, weights, done, error_t), torch.stack([error_t, ok.double()])

    state: _State = (
        factors,
        [f.mT @ f for f in factors],  # each (B, R, R)
        torch.ones(batch, rank, dtype=x.dtype, device=device),
        torch.zeros(batch, dtype=torch.bool, device=device),  # converged, on the device
        torch.full((batch,), float("inf"), dtype=torch.float64, device=device),
    )
    replay = None
    if graph:
        try:
            with torch.cuda.device(device):  # capture on the stack's GPU
                replay = _capture(sweep, state, device)
        except RuntimeError as exc:  # e.g. a driver without graph support for these calls
            logger.warning("cp_als_many: CUDA graph capture failed (%s); sweeping eagerly", exc)
            graph = False
    pending: list[torch.Tensor] = []  # (2, B) (error, ok) of the sweeps the host has not read
    history: list[list[float]] = [[] for _ in range(batch)]  # errors the host has read
    converged_at: list[int | None] = [None] * batch
    it = 0
    for it in range(1, n_iter + 1):
        if replay is not None:
            pending.append(replay())
        else:
            state, row = sweep(state, any_exact)
            pending.append(row)
        if it % every and it < n_iter:
            continue
        rows = torch.stack(pending).tolist()  # (sweeps, 2, B); one sync every `every` sweeps
        first = it - len(rows) + 1
        pending = []
        failed: list[str] = []
        for b in (b for b in range(batch) if converged_at[b] is None):
            errors = history[b]
            for sweep_no, (errs, goods) in enumerate(rows, start=first):
                error = errs[b]
                if error != error or not goods[b]:
                    failed.append(f"tensors[{idx[b]}] after {sweep_no} sweeps")
                    break
                errors.append(error)
                stalled = error < tol or (len(errors) > 1 and abs(errors[-2] - error) < tol)
                if stalled and (exact[b] or error >= exact_below):
                    converged_at[b] = sweep_no
                    break
        if failed:
            raise DecompositionError(
                f"cp_als_many: NaN/Inf or a singular normal matrix at rank {rank} in "
                f"{', '.join(failed)}; expected finite factors; raise reg (e.g. 1e-2) or lower "
                "the rank"
            )
        if all(c is not None for c in converged_at):
            break
        switch = [b for b in range(batch) if converged_at[b] is None and not exact[b]]
        switch = [b for b in switch if history[b][-1] < exact_below]
        if switch:  # as cp_als, per item: the identity is too coarse this close to the data
            for b in switch:
                exact[b] = True
            exact_mask.copy_(torch.tensor(exact))  # in place: a captured graph reads it
            any_exact = True
    if replay is not None:
        state = replay.state
    logger.debug("cp_als_many: %d tensor(s) of %s at rank %d, %d sweeps", batch, shape, rank, it)
    return state[2], state[0], history, converged_at


class _GraphedSweep:
    """A captured sweep: ``state`` holds the static tensors, each call runs one sweep in place
    and returns a copy of that sweep's ``(2, B)`` (error, ok)."""

    def __init__(self, graph: torch.cuda.CUDAGraph, state: _State, row: torch.Tensor) -> None:
        self.graph, self.state, self.row = graph, state, row

    def __call__(self) -> torch.Tensor:
        self.graph.replay()
        return self.row.clone()


def _flat(state: _State) -> list[torch.Tensor]:
    return [*state[0], *state[1], *state[2:]]


def _capture(sweep: Callable[..., Any], state: _State, device: torch.device) -> _GraphedSweep:
    """Capture ``sweep(state, True)`` so that each replay writes the next state in place."""
    static: _State = (
        [t.clone() for t in state[0]],
        [t.clone() for t in state[1]],
        state[2].clone(),
        state[3].clone(),
        state[4].clone(),
    )
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up (library handles, workspaces); results dropped
        sweep(static, True)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        new, row = sweep(static, True)
        for dst, src in zip(_flat(static), _flat(new), strict=True):
            dst.copy_(src)
    return _GraphedSweep(graph, static, row)


def cp_als_many(
    tensors: Sequence[torch.Tensor],
    ranks: Sequence[int],
    *,
    n_iter: int = 500,
    tol: float = 1e-7,
    init: str = "svd",
    reg: float = 1e-3,
    seed: int = 0,
    require_convergence: bool = True,
    check_every: int | None = None,
    cuda_graph: bool | None = None,
) -> list[CPResult]:
    """CP decompositions of many tensors, same-shape tensors batched (Lebedev et al., 2015,
    arXiv:1412.6553).

    Tensors are grouped by (shape, rank, dtype, device); each group is stacked and runs the
    sweeps of :func:`~slimtorch.decompose.cp.cp_als` (proximal Tikhonov ALS, dimension-tree
    MTTKRP, errors from the Gram matrices) with batched products and one batched Cholesky
    factorisation and solve per mode and sweep for the whole group. Each item's maths is that
    of :func:`cp_als` with the same arguments: the same start (its own seeded generator), the
    same damping ``reg * mean(diag(V_n))`` of its own Gram product, the same switch to errors
    from the reconstruction once its error falls below ``1e3 * sqrt(eps)``, the same stopping
    rule. An item is done when its error, or its error change since the previous sweep, falls
    below ``tol``; its factors are frozen from then on and its ``iterations`` is that sweep. A
    group stops when all its items are done (read on the host every ``check_every`` sweeps) or
    after ``n_iter`` sweeps. Results therefore match :func:`cp_als` per tensor up to rounding
    (batched and single products may round differently). As in :func:`cp_als`, each tensor is
    divided by its :func:`~slimtorch.decompose.linalg.unit_scale` (a power of two) and its
    weights multiplied by it at the end, so no result depends on its tensor's scale; an
    all-zero tensor (tested value by value, not by a norm that tiny values underflow) gets
    zero weights.

    Args:
        tensors: 3-D or higher float32/float64 tensors on any devices.
        ranks: One number of rank-1 terms ``R >= 1`` per tensor.
        n_iter: Maximum ALS sweeps ``>= 1``.
        tol: A tensor has converged when its relative error changes by less than ``tol``
            between sweeps (or falls below ``tol``).
        init: ``"svd"`` or ``"random"``, as in :func:`cp_als`.
        reg: Proximal Tikhonov strength ``>= 0`` relative to the Gram diagonal (0: plain ALS).
        seed: Seed of the random columns, the same for every tensor (each tensor gets the
            columns :func:`cp_als` would draw for it).
        require_convergence: Raise when some tensor does not reach ``tol`` within ``n_iter``
            sweeps; when False return those with ``converged=False`` and log one warning.
        check_every: Sweeps between the host's reads of a group's errors (each read
            synchronises the device); ``None`` picks 1 on the CPU and 8 elsewhere. The results
            do not depend on it.
        cuda_graph: Run each group's sweeps as a replayed CUDA graph (one launch per sweep
            instead of about two hundred); ``None`` uses graphs on NVIDIA CUDA devices. Ignored
            elsewhere. A capture that fails falls back to ordinary launches (logged).

    Returns:
        One :class:`~slimtorch.decompose.cp.CPResult` per tensor, in input order, on the
        tensor's device and dtype (views into the group's batched results).

    Raises:
        TypeError, ValueError: bad arguments; one error lists every bad tensor by index.
        DecompositionError: tensors with NaN/Inf (all listed by index), runs that produced
            NaN/Inf or diverged, or (with ``require_convergence``) ones that did not converge.

    Example:
        >>> a, b, c, d = (torch.randn(n, 2, dtype=torch.float64) for n in (6, 5, 3, 3))
        >>> x = torch.einsum("ir,jr,kr,lr->ijkl", a, b, c, d)
        >>> out = cp_als_many([x, 2 * x], [2, 2], n_iter=500, tol=1e-12)
        >>> [r.rel_error < 1e-6 and r.converged for r in out]
        [True, True]
    """
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
        raise TypeError(
            f"tensors must be a sequence of tensors (a list), got {type(tensors).__name__}; "
            "wrap a single tensor in a list or call cp_als"
        )
    if isinstance(ranks, torch.Tensor) or not isinstance(ranks, Sequence):
        raise TypeError(f"ranks must be a sequence of ints (one per tensor), got {ranks!r}")
    check_cp_options(n_iter, tol, init, reg, check_every)
    rank_list = check_each("cp_als_many", ("tensors", "ranks"), tensors, ranks, _check_item)
    groups = stack_groups("cp_als_many", "tensors", tensors, rank_list)
    nonzero = {  # one host read per group; a norm of tiny values would underflow to 0
        key: (stack != 0).flatten(1).any(1).tolist() for key, (_, stack) in groups.items()
    }
    results: list[CPResult | None] = [None] * len(tensors)
    for key, (idx, stack) in groups.items():
        rank, device = key[1], key[3]
        units = unit_scale(stack, per_item=True)  # (B,) powers of two, as in cp_als
        stack = stack / units.reshape(-1, *[1] * (stack.ndim - 1))  # exact
        starts = [init_factors(stack[b], rank, init, seed) for b in range(len(idx))]
        for b in (b for b, nz in enumerate(nonzero[key]) if not nz):  # the zero tensor
            zeros = torch.zeros(rank, dtype=key[2], device=device)
            results[idx[b]] = CPResult(zeros, starts[b], 0, 0.0, True, [0.0])
        live = [b for b, nz in enumerate(nonzero[key]) if nz]
        if not live:
            continue
        x = stack if len(live) == len(idx) else stack[live]  # (B, *shape)
        factors = [torch.stack([starts[b][n] for b in live]) for n in range(len(key[0]))]
        every = _default_check_every(device) if check_every is None else check_every
        items = [idx[b] for b in live]
        weights, factors, history, converged_at = _cp_stack(
            x,
            factors,
            items,
            n_iter=n_iter,
            tol=tol,
            reg=reg,
            every=every,
            graph=_use_cuda_graph(device, cuda_graph),
        )
        residual = (_cp_to_full(weights, factors) - x).flatten(1)  # (B, numel)
        norm_x = torch.linalg.vector_norm(x.flatten(1), dim=1)  # (B,)
        rel = (torch.linalg.vector_norm(residual, dim=1) / norm_x).tolist()  # one host read
        diverged = [
            f"tensors[{i}] (relative error {e:.3g})"
            for i, e in zip(items, rel, strict=True)
            if e != e or e > 1.0 + 1e-6
        ]
        if diverged:
            raise DecompositionError(
                f"cp_als_many diverged at rank {rank}: {', '.join(diverged)} (expected < 1, the "
                "error of the zero tensor); raise reg or lower the rank"
            )
        for b, i in enumerate(items):
            sweep, errors = converged_at[b], history[b]
            errors[-1] = rel[b]
            results[i] = CPResult(
                weights[b] * units[live[b]],
                [f[b] for f in factors],
                n_iter if sweep is None else sweep,
                rel[b],
                sweep is not None,
                errors,
            )
    out = [r for r in results if r is not None]
    late = [i for i, r in enumerate(out) if not r.converged]
    if late:
        msg = (
            f"cp_als_many: tensors {late} did not converge: error change still >= tol={tol:g} "
            f"after {n_iter} sweeps (relative errors "
            f"{', '.join(f'{out[i].rel_error:.4g}' for i in late)})"
        )
        if require_convergence:
            raise DecompositionError(msg + "; raise n_iter or tol, or lower the rank")
        logger.warning("%s; returning the last iterates", msg)
    return out
