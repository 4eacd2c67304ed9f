"""Build a sparse-training callback from plain arguments (what ``slimtorch train --sparse`` maps
to)."""

from __future__ import annotations

from collections.abc import Sequence

from slimtorch.sparse.config import SparseTrainingConfig
from slimtorch.sparse.dst import KINDS, SET, RigL, StaticSparse


def make_sparse_callback(
    kind: str,
    sparsity: float,
    *,
    distribution: str = "erk",
    delta_t: int = 100,
    alpha: float = 0.3,
    t_end: float = 0.75,
    dense_first: bool = False,
    dense_last: bool = False,
    seed: int = 0,
    scale_init: bool = True,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> StaticSparse:
    """Build a sparse-training callback from plain arguments (what ``--sparse`` maps to).

    Args:
        kind: ``"static"``, ``"set"`` or ``"rigl"``.
        sparsity: Fraction of the targeted weights kept at zero, in [0, 1).
        distribution: ``"erk"`` or ``"uniform"``.
        delta_t: Steps between mask updates.
        alpha: Initial drop fraction.
        t_end: Fraction of the run after which masks stay fixed.
        dense_first: Keep the first targeted layer dense.
        dense_last: Keep the last targeted layer dense.
        seed: Seed of the masks and of SET's regrowth.
        scale_init: Sparse-aware initial weights (see :class:`SparseTrainingConfig`).
        include: Globs of layers to make sparse.
        exclude: Globs of layers to leave dense.

    Example:
        >>> type(make_sparse_callback("set", 0.8)).__name__
        'SET'
    """
    classes: dict[str, type[StaticSparse]] = {"static": StaticSparse, "set": SET, "rigl": RigL}
    if kind not in classes:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    config = SparseTrainingConfig(
        sparsity=sparsity,
        distribution=distribution,
        dense_first=dense_first,
        dense_last=dense_last,
        delta_t=delta_t,
        alpha=alpha,
        t_end=t_end,
        seed=seed,
        scale_init=scale_init,
    )
    return classes[kind](config, include=include, exclude=exclude)
