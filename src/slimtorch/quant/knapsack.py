"""One option per layer under a budget with the least total loss: a multiple-choice knapsack.

:func:`allocate` solves it by dynamic programming over the budget. When every cost is a whole
number (bytes) and the budget in units of their greatest common divisor is at most
:data:`EXACT_STEPS` (and the layers times those units at most :data:`EXACT_CELLS`), the steps
are those units and the result is exact. Otherwise (seconds of a
latency budget) the budget is cut into ``bins`` steps and each cost rounded up to a whole step,
so the result always fits the real budget but can miss a plan that fits it only to within the
rounding (up to one step per layer).

Example:
    >>> allocate({"a": {"x": 0.0, "y": 1.0}}, {"a": {"x": 10.0, "y": 5.0}}, 6.0)
    {'a': 'y'}
"""

from __future__ import annotations

import math
from functools import reduce

import numpy as np

EXACT_STEPS = 8_000_000
"""Largest budget, in units of the costs' common divisor, solved exactly (about 8 MB of choices
per layer at most)."""

EXACT_CELLS = 128_000_000
"""Largest layers x budget units solved exactly: the work and the choices kept grow with both
(300 layers at 4.8M units took 41 s and 1.5 GB; this bound keeps it to a few seconds)."""


def _least_loss(loss: dict[str, float], cost: dict[str, float]) -> str:
    """The option of least loss (the cheaper one on a tie)."""
    return min(cost, key=lambda o: (loss[o], cost[o]))


def _steps(costs: dict[str, dict[str, float]], budget: float, bins: int) -> tuple[float, int]:
    """The DP's step and number of steps: exact units for whole-number costs, else ``bins``."""
    values = [c for opts in costs.values() for c in opts.values()]
    if all(float(c).is_integer() and c >= 0 for c in values) and budget >= 0:
        unit = reduce(math.gcd, (int(c) for c in values), 0) or 1
        cap = min(EXACT_STEPS, EXACT_CELLS // max(1, len(costs)))
        if budget // unit <= cap:
            return float(unit), int(budget // unit)
        bins = max(bins, cap)  # as fine as the work bound allows: far finer than the default
    return (budget / bins if budget > 0 else 1.0), bins


def allocate(
    losses: dict[str, dict[str, float]],
    costs: dict[str, dict[str, float]],
    budget: float,
    bins: int = 2000,
) -> dict[str, str]:
    """The choice per layer with the least total loss whose total cost fits ``budget``.

    Each layer's options are the keys of ``costs[layer]``; see the module docstring for when
    the answer is exact.

    Raises:
        ValueError: No choice fits (the cheapest options together exceed ``budget``).

    Example:
        >>> losses = {"a": {"int8": 0.1, "int4": 0.9}, "b": {"int8": 0.2, "int4": 0.3}}
        >>> costs = {"a": {"int8": 436.0, "int4": 218.0}, "b": {"int8": 873.0, "int4": 437.0}}
        >>> allocate(losses, costs, 873.0)  # fits to the byte
        {'a': 'int8', 'b': 'int4'}
    """
    names = list(costs)
    cheapest = sum(min(costs[n].values()) for n in names)
    if cheapest > budget:
        raise ValueError(
            f"no allocation fits: the cheapest options cost {cheapest:.6g} together, over the "
            f"budget of {budget:.6g}"
        )
    best = {n: _least_loss(losses[n], costs[n]) for n in names}
    if sum(costs[n][best[n]] for n in names) <= budget:  # each layer's least loss fits: optimal
        return best  # (the rounded-up costs below could push this exact fit over the budget)
    unit, steps = _steps(costs, budget, bins)
    dp = np.full(steps + 1, np.inf)
    dp[0] = 0.0
    picks: list[tuple[list[str], np.ndarray, list[int]]] = []
    for n in names:
        opts = list(costs[n])
        icost = [min(steps + 1, math.ceil(costs[n][o] / unit - 1e-9)) for o in opts]
        new = np.full(steps + 1, np.inf)
        arg = np.full(steps + 1, -1, dtype=np.int8)  # an option index (a few per layer)
        for i, (o, c) in enumerate(zip(opts, icost, strict=True)):
            if c > steps:
                continue
            shifted = np.full(steps + 1, np.inf)
            shifted[c:] = dp[: steps + 1 - c] + losses[n][o]
            better = shifted < new
            new[better], arg[better] = shifted[better], i
        dp = new
        picks.append((opts, arg, icost))
    if not np.isfinite(dp).any():  # rounding up pushed a barely feasible set over: cheapest all
        return {n: min(costs[n], key=costs[n].__getitem__) for n in names}
    b = int(np.argmin(dp))
    choice: dict[str, str] = {}
    for n, (opts, arg, icost) in zip(reversed(names), reversed(picks), strict=True):
        i = int(arg[b])
        choice[n] = opts[i]
        b -= icost[i]
    return {n: choice[n] for n in names}
