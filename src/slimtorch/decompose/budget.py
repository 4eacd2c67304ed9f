"""Per-layer rank choice under a total budget (parameters, FLOPs or any pluggable cost).

Each layer offers a ladder of options (ranks, reconstruction error, params, FLOPs). Starting from
every layer's most accurate option, the greedy loop repeatedly takes the single move, over all
layers and all of their cheaper options, with the least (sensitivity-weighted) error increase per
unit of cost saved, until the total cost meets the target. Because a move may jump several rungs
(the dense layer's first cheaper rung is often a large step), the last moves can overshoot; a
second pass then spends the slack left, repeatedly taking the single move to a more accurate rung
that still fits under the target with the largest error decrease per unit of cost added. This is
the classic greedy for the multiple-choice knapsack relaxation: not always optimal, but exact
whenever each ladder's error-vs-cost curve is convex, and what Zhang et al. (2016, "Accelerating
very deep convolutional networks for classification and detection", arXiv:1505.06798) use to
spread ranks over layers.

The cost of an option is ``option.params`` or ``option.flops`` (``metric``), unless a cost
callable is given, globally or per layer: plug a latency model in there.

Example:
    >>> a = LayerLadder("a", [RankOption((8,), 0.0, 100), RankOption((4,), 0.1, 50)])
    >>> b = LayerLadder("b", [RankOption((8,), 0.0, 100), RankOption((4,), 0.5, 50)])
    >>> select_ranks_for_budget([a, b], target=150).choices["a"].ranks
    (4,)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Literal

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RankOption:
    """One rung of a layer's ladder.

    Attributes:
        ranks: The ranks of this option (``()`` may stand for the dense layer).
        error: Reconstruction error (e.g. relative Frobenius error of the weight), ``>= 0``.
        params: Parameter count with this option.
        flops: FLOPs per sample with this option, if known.
    """

    ranks: tuple[int, ...]
    error: float
    params: int
    flops: int | None = None


CostFn = Callable[[str, RankOption], float]


@dataclasses.dataclass(frozen=True)
class LayerLadder:
    """A layer's options, an optional error weight and an optional cost callable.

    Attributes:
        name: Dotted module name.
        options: At least one :class:`RankOption`.
        sensitivity: Weight of this layer's error in the objective (``> 0``), e.g. the accuracy
            drop measured when the layer alone is compressed.
        cost_fn: ``cost_fn(name, option) -> cost``; overrides the global one and ``metric``.
    """

    name: str
    options: Sequence[RankOption]
    sensitivity: float = 1.0
    cost_fn: CostFn | None = None


@dataclasses.dataclass(frozen=True)
class BudgetSelection:
    """The chosen option per layer, with the totals."""

    choices: dict[str, RankOption]
    total_cost: float
    total_error: float
    target: float


def select_ranks_for_budget(
    layers: Sequence[LayerLadder],
    *,
    target: float,
    metric: Literal["params", "flops"] = "params",
    cost_fn: CostFn | None = None,
) -> BudgetSelection:
    """Choose one option per layer so the summed cost is ``<= target`` with little summed error.

    Greedy by error increase per cost saved (see the module docstring; Zhang et al., 2016,
    arXiv:1505.06798).

    Args:
        layers: One :class:`LayerLadder` per layer (distinct names).
        target: The total cost allowed (same unit as the costs), ``> 0``.
        metric: ``"params"`` or ``"flops"``: which option field is the cost when no callable is
            given.
        cost_fn: Global cost callable ``(name, option) -> float``.

    Returns:
        A :class:`BudgetSelection`.

    Raises:
        ValueError: bad arguments, a missing FLOPs figure, or a target below the cheapest
            achievable total.

    Example:
        >>> ladder = LayerLadder("fc", [RankOption((4,), 0.2, 40), RankOption((8,), 0.0, 80)])
        >>> select_ranks_for_budget([ladder], target=60).choices["fc"].ranks
        (4,)
    """
    if metric not in ("params", "flops"):
        raise ValueError(f"metric must be 'params' or 'flops', got {metric!r}")
    if isinstance(target, bool) or not isinstance(target, int | float) or not target > 0:
        raise ValueError(f"target must be a number > 0 (a total cost), got {target!r}")
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names) or not layers:
        raise ValueError(f"layers must be a non-empty list with distinct names, got {names}")

    def cost_of(layer: LayerLadder, option: RankOption) -> float:
        fn = layer.cost_fn or cost_fn
        if fn is not None:
            return float(fn(layer.name, option))
        value = option.params if metric == "params" else option.flops
        if value is None:
            raise ValueError(
                f"layer {layer.name!r} option {option.ranks} has no {metric} figure; fill "
                "RankOption.flops (e.g. from an example input) or pass cost_fn"
            )
        return float(value)

    ladders: dict[str, list[tuple[float, float, RankOption]]] = {}
    for layer in layers:
        if not layer.options:
            raise ValueError(f"layer {layer.name!r} has no options; give at least one")
        if not layer.sensitivity > 0:
            raise ValueError(
                f"layer {layer.name!r} sensitivity must be > 0, got {layer.sensitivity!r}"
            )
        rungs = [(cost_of(layer, o), layer.sensitivity * o.error, o) for o in layer.options]
        ladders[layer.name] = sorted(rungs, key=lambda t: (t[1], t[0]))  # most accurate first
    current = {name: rungs[0] for name, rungs in ladders.items()}
    cheapest = sum(min(c for c, _, _ in rungs) for rungs in ladders.values())
    if cheapest > target:
        raise ValueError(
            f"target {target:g} is below the cheapest achievable total {cheapest:g}; raise the "
            "target or add lower-rank options"
        )
    total = sum(c for c, _, _ in current.values())
    while total > target:
        best: tuple[float, str, tuple[float, float, RankOption]] | None = None
        for name, rungs in ladders.items():
            cost, err, _ = current[name]
            for rung in rungs:
                if rung[0] < cost:
                    ratio = max(rung[1] - err, 0.0) / (cost - rung[0])
                    if best is None or ratio < best[0]:
                        best = (ratio, name, rung)
        assert best is not None  # cheapest <= target guarantees a cheaper rung exists
        _, name, rung = best
        total += rung[0] - current[name][0]
        current[name] = rung
        logger.debug("budget: %s -> ranks %s (total cost %.4g)", name, rung[2].ranks, total)
    while True:  # spend the slack: upgrades that still fit, best error decrease per cost first
        up: tuple[float, str, tuple[float, float, RankOption]] | None = None
        for name, rungs in ladders.items():
            cost, err, _ = current[name]
            for rung in rungs:
                if rung[1] < err and total + rung[0] - cost <= target:
                    ratio = (err - rung[1]) / max(rung[0] - cost, 1e-12)
                    if up is None or ratio > up[0]:
                        up = (ratio, name, rung)
        if up is None:
            break
        _, name, rung = up
        total += rung[0] - current[name][0]
        current[name] = rung
        logger.debug("budget: %s up to ranks %s (total cost %.4g)", name, rung[2].ranks, total)
    choices = {name: rung[2] for name, rung in current.items()}
    error = sum(rung[1] for rung in current.values())
    return BudgetSelection(choices, total, error, float(target))
