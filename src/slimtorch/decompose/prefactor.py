"""Factorise a whole model's kernels in batches before :func:`decompose_` builds the layers.

On a GPU, factorising kernels one by one is bound by launches and solver calls, not by the
arithmetic: ResNet-50's 53 kernels take 2.44 s per kernel against 2.16 s batched for Tucker-2
and 4.75 s against 0.66 s for CP on an H100 (docs/benchmarks.md, decomposition speed).
:func:`prefactor` runs :func:`~slimtorch.decompose.batched.tucker2_many` or
:func:`~slimtorch.decompose.cp_batched.cp_als_many` once on every targeted kernel whose ranks
are known up front, and :func:`batch_results` makes the results visible to the handlers for
the duration of one ``decompose_`` call; a handler takes a result with :func:`lookup` by the
kernel's storage, version, ranks and settings, and factorises alone when there is none (a
layer that failed in the batch, or one the batch did not cover), so results and skip reasons
are those of the per-layer path, up to rounding.

Example:
    >>> w = torch.randn(8, 8, 3, 3)
    >>> key = tucker_key(w, (2, 2), 5, 1e-7)
    >>> with batch_results(prefactor([("tucker", key, w, (2, 2))], n_iter=5, tol=1e-7)):
    ...     tuple(lookup(key).core.shape)
    (2, 2, 3, 3)
    >>> lookup(key) is None  # outside the call
    True
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from slimtorch.decompose.batched import tucker2_many
from slimtorch.decompose.cp_batched import cp_als_many

logger = logging.getLogger(__name__)

Request = tuple[str, tuple[Any, ...], torch.Tensor, Any]  # (method, key, weight, ranks)

_RESULTS: contextvars.ContextVar[dict[tuple[Any, ...], Any] | None] = contextvars.ContextVar(
    "slimtorch_decompose_prefactored", default=None
)


def weight_key(weight: torch.Tensor) -> tuple[Any, ...]:
    """Identity of a kernel's current values: storage, layout and in-place version."""
    return (
        weight.data_ptr(),
        tuple(weight.shape),
        weight.stride(),
        weight.dtype,
        weight.device,
        weight._version,
    )


def tucker_key(
    weight: torch.Tensor, ranks: tuple[int, int], n_iter: int, tol: float
) -> tuple[Any, ...]:
    return ("tucker", weight_key(weight), tuple(ranks), n_iter, tol)


def cp_key(weight: torch.Tensor, rank: int, options: dict[str, Any]) -> tuple[Any, ...]:
    return ("cp", weight_key(weight), rank, tuple(sorted(options.items())))


def lookup(key: tuple[Any, ...]) -> Any | None:
    """The batched result for ``key`` inside :func:`batch_results`, else ``None``."""
    results = _RESULTS.get()
    return None if results is None else results.get(key)


@contextlib.contextmanager
def batch_results(results: dict[tuple[Any, ...], Any]) -> Iterator[None]:
    """Make ``results`` (from :func:`prefactor`) visible to :func:`lookup` within the block."""
    token = _RESULTS.set(results)
    try:
        yield
    finally:
        _RESULTS.reset(token)


def prefactor(requests: Sequence[Request], **options: Any) -> dict[tuple[Any, ...], Any]:
    """Run the batched factorisations of ``requests`` (all of one method); key -> result.

    ``options`` are the method's settings (``n_iter``, ``tol``; for CP also ``reg``, ``init``).
    CP runs with ``require_convergence=False``: each result carries ``converged`` and the
    handler applies the layer's own rule. A batch that fails as a whole (a NaN item, a solver
    error) returns no results, so every layer falls back to its own factorisation and reports
    its own reason.
    """
    if not requests:
        return {}
    methods = {r[0] for r in requests}
    if len(methods) != 1 or not methods <= {"tucker", "cp"}:
        raise ValueError(f"requests must all be 'tucker' or all 'cp', got {sorted(methods)}")
    weights = [r[2] for r in requests]
    ranks = [r[3] for r in requests]
    try:
        if methods == {"tucker"}:
            out: list[Any] = tucker2_many(weights, ranks, **options)
        else:
            out = cp_als_many(weights, ranks, require_convergence=False, **options)
    except Exception as exc:  # each layer then factorises alone and reports its own reason
        logger.info("batched factorisation failed (%s: %s); per layer", type(exc).__name__, exc)
        return {}
    return {r[1]: result for r, result in zip(requests, out, strict=True)}


__all__ = [
    "batch_results",
    "cp_key",
    "lookup",
    "prefactor",
    "tucker_key",
    "weight_key",
]
