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
import math
from collections.abc import Callable, Mapping, Sequence
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
    target: float | None = None,
    metric: Literal["params", "flops"] = "params",
    cost_fn: CostFn | None = None,
    targets: Mapping[str, float] | None = None,
) -> BudgetSelection:
    """Choose one option per layer so the summed cost is ``<= target`` with little summed error.

    Greedy by error increase per cost saved (see the module docstring; Zhang et al., 2016,
    arXiv:1505.06798). With several budgets at once (``targets={"params": p, "flops": f}``)
    every total must meet its own target: a move's saving is counted, for each budget not yet
    met, as the fraction of that budget's remaining excess it removes, and the slack pass only
    takes upgrades that keep every budget met (cost added counted as fractions of the targets).
    With one budget this is the same order as the single-budget rule.

    Args:
        layers: One :class:`LayerLadder` per layer (distinct names).
        target: The total cost allowed (same unit as the costs), ``> 0``.
        metric: ``"params"`` or ``"flops"``: which option field is the cost when no callable is
            given.
        cost_fn: Global cost callable ``(name, option) -> float`` (single budget only).
        targets: Several budgets, ``{"params": total, "flops": total}``, instead of
            ``target``/``metric``.

    Returns:
        A :class:`BudgetSelection` (``total_cost`` is the first budget's total).

    Raises:
        ValueError: bad arguments, a missing FLOPs figure, or a target below the cheapest
            achievable total.

    Example:
        >>> ladder = LayerLadder("fc", [RankOption((4,), 0.2, 40), RankOption((8,), 0.0, 80)])
        >>> select_ranks_for_budget([ladder], target=60).choices["fc"].ranks
        (4,)
    """
    if targets is None:
        if metric not in ("params", "flops"):
            raise ValueError(f"metric must be 'params' or 'flops', got {metric!r}")
        if target is None:
            raise ValueError("give target (with metric) or targets")
        targets = {metric: target}
    elif target is not None or cost_fn is not None:
        raise ValueError("targets replaces target/metric/cost_fn; give one form, not both")
    if not targets:
        raise ValueError("targets must name at least one budget, e.g. {'params': 1e5}")
    for key, value in targets.items():
        if key not in ("params", "flops"):
            raise ValueError(f"budget metric must be 'params' or 'flops', got {key!r}")
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ValueError(f"target must be a number > 0 (a total cost), got {value!r}")
    keys = list(targets)
    goal = [float(targets[k]) for k in keys]
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names) or not layers:
        raise ValueError(f"layers must be a non-empty list with distinct names, got {names}")

    def cost_of(layer: LayerLadder, option: RankOption) -> tuple[float, ...]:
        fn = layer.cost_fn or cost_fn
        if fn is not None and len(keys) == 1:
            return (float(fn(layer.name, option)),)
        out = []
        for key in keys:
            value = option.params if key == "params" else option.flops
            if value is None:
                raise ValueError(
                    f"layer {layer.name!r} option {option.ranks} has no {key} figure; fill "
                    "RankOption.flops (e.g. from an example input) or pass cost_fn"
                )
            out.append(float(value))
        return tuple(out)

    Rung = tuple[tuple[float, ...], float, RankOption]
    ladders: dict[str, list[Rung]] = {}
    for layer in layers:
        if not layer.options:
            raise ValueError(f"layer {layer.name!r} has no options; give at least one")
        if not 0 < layer.sensitivity < math.inf:  # inf times a zero error is NaN
            raise ValueError(
                f"layer {layer.name!r} sensitivity must be a finite number > 0, got "
                f"{layer.sensitivity!r}"
            )
        rungs = [(cost_of(layer, o), layer.sensitivity * o.error, o) for o in layer.options]
        ladders[layer.name] = sorted(rungs, key=lambda t: (t[1], t[0]))  # most accurate first
    current = {name: rungs[0] for name, rungs in ladders.items()}
    for i, key in enumerate(keys):
        cheapest = sum(min(c[i] for c, _, _ in rungs) for rungs in ladders.values())
        if cheapest > goal[i]:
            raise ValueError(
                f"{key} target {goal[i]:g} is below the cheapest achievable total {cheapest:g} "
                "(every layer at its lowest rank); raise the target"
            )
    total = [sum(c[i] for c, _, _ in current.values()) for i in range(len(keys))]

    def unmet() -> list[int]:
        return [i for i in range(len(keys)) if total[i] > goal[i]]

    def move(name: str, rung: Rung, what: str) -> None:
        for i in range(len(keys)):
            total[i] += rung[0][i] - current[name][0][i]
        current[name] = rung
        logger.debug("budget: %s %s ranks %s (totals %s)", name, what, rung[2].ranks, total)

    while need := unmet():
        best: tuple[float, str, Rung] | None = None
        for name, rungs in ladders.items():
            cost, err, _ = current[name]
            for rung in rungs:
                gain = sum(max(cost[i] - rung[0][i], 0.0) / (total[i] - goal[i]) for i in need)
                if gain <= 0 or any(rung[0][i] > cost[i] for i in need):
                    continue
                if any(  # never break a budget already met: the loop must end
                    total[i] + rung[0][i] - cost[i] > goal[i]
                    for i in range(len(keys))
                    if i not in need
                ):
                    continue
                ratio = max(rung[1] - err, 0.0) / gain
                if best is None or ratio < best[0]:
                    best = (ratio, name, rung)
        if best is None:  # only moves that trade one budget against another are left
            raise ValueError(
                f"no option set meets every budget at once ({dict(zip(keys, goal, strict=True))}"
                f"); the cheapest options reach {dict(zip(keys, total, strict=True))}"
            )
        move(best[1], best[2], "->")
    while True:  # spend the slack: upgrades that still fit, best error decrease per cost first
        up: tuple[float, str, Rung] | None = None
        for name, rungs in ladders.items():
            cost, err, _ = current[name]
            for rung in rungs:
                fits = all(total[i] + rung[0][i] - cost[i] <= goal[i] for i in range(len(keys)))
                if rung[1] < err and fits:
                    added = sum((rung[0][i] - cost[i]) / goal[i] for i in range(len(keys)))
                    ratio = (err - rung[1]) / max(added, 1e-12)
                    if up is None or ratio > up[0]:
                        up = (ratio, name, rung)
        if up is None:
            break
        move(up[1], up[2], "up to")
    choices = {name: rung[2] for name, rung in current.items()}
    error = sum(rung[1] for rung in current.values())
    return BudgetSelection(choices, total[0], error, goal[0])
