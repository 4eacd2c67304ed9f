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
spread ranks over layers. With one budget the moves are found through heaps, in time near-linear
in the number of layers, and are exactly those of the plain scan over every layer and rung.

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
import heapq
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Literal, NoReturn

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
_Rung = tuple[tuple[float, ...], float, RankOption]  # (costs, weighted error, option)
_TAME = 1e50  # fast path: every cost, weighted error and the target is 0 or in [1/_TAME, _TAME]
_NEAR = 1e-12  # ratios further apart than this (relative) keep their order under float rounding


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

    ladders: dict[str, list[_Rung]] = {}
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

    def move(name: str, rung: _Rung, what: str) -> None:
        for i in range(len(keys)):
            total[i] += rung[0][i] - current[name][0][i]
        current[name] = rung
        logger.debug("budget: %s %s ranks %s (totals %s)", name, what, rung[2].ranks, total)

    def stuck() -> NoReturn:
        raise ValueError(
            f"no option set meets every budget at once ({dict(zip(keys, goal, strict=True))}"
            f"); the cheapest options reach {dict(zip(keys, total, strict=True))}"
        )

    rows = list(ladders.values())
    if len(keys) == 1 and _tame(rows, goal[0]):
        at = [0] * len(rows)  # index of each layer's current rung

        def step(li: int, ri: int, what: str) -> None:
            at[li] = ri
            move(names[li], rows[li][ri], what)

        if not _shrink_one(rows, at, total, goal[0], step):
            stuck()
        _fill_one(rows, at, total, goal[0], step)
    else:  # several budgets, or values the fast path cannot vouch for: scan every move
        while need := unmet():
            best: tuple[float, str, _Rung] | None = None
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
                stuck()
            move(best[1], best[2], "->")
        while True:  # spend the slack: upgrades that still fit, best error decrease per cost first
            up: tuple[float, str, _Rung] | None = None
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


def _tame(rows: list[list[_Rung]], goal: float) -> bool:
    """Whether every cost, weighted error and the target is 0 or in ``[1/_TAME, _TAME]``.

    Then no quotient of :func:`_shrink_one` underflows, overflows or is NaN, so float roundings
    stay within a few units in the last place of the exact values.
    """
    low, high = 1 / _TAME, _TAME
    values = [goal, *(x for rungs in rows for (c,), e, _ in rungs for x in (c, e))]
    return all(x == 0 or low <= abs(x) <= high for x in values)


def _shrink_one(
    rows: list[list[_Rung]],
    at: list[int],
    total: list[float],
    goal: float,
    step: Callable[[int, int, str], None],
) -> bool:
    """The shrinking pass with one budget, making the same moves as the scan in near-linear time.

    The scan's ratio of a downgrade is ``de / (ds / excess)`` (``de`` the error added, ``ds`` the
    cost saved), i.e. ``(de / ds) * excess`` give or take a few roundings: the shared ``excess``
    scales every ratio alike, so ``de / ds`` ranks the moves and only changes for a layer that
    moves. Moves are kept in a heap keyed by ``de / ds``, grouped by ``(de, ds)`` (equal pairs give
    equal ratios, the first layer and rung winning); the few groups whose keys lie within
    ``_NEAR`` of the best are then compared with the scan's own float formula, as roundings can
    only reorder those (``_tame`` values keep every quotient a normal float). Returns False when
    the budget is unmet and no layer has a cheaper rung left.
    """
    version = [0] * len(rows)
    groups: dict[tuple[float, float], list[tuple[int, int, int]]] = {}  # (li, ri, version)
    heap: list[tuple[float, float, float]] = []  # (de / ds, de, ds), one per key of groups

    def offer(li: int) -> None:  # the layer's downgrades that can be the best one
        (cost,), err, _ = rows[li][at[li]]
        moves = []
        for ri, ((c,), e, _) in enumerate(rows[li]):
            if c < cost:
                de, ds = max(e - err, 0.0), cost - c
                moves.append((de / ds, de, ds, ri))
        bound = min((m[0] for m in moves), default=0.0) * (1 + _NEAR)
        for k, de, ds, ri in moves:
            if k <= bound:
                if (de, ds) not in groups:
                    groups[de, ds] = []
                    heapq.heappush(heap, (k, de, ds))
                heapq.heappush(groups[de, ds], (li, ri, version[li]))

    for li in range(len(rows)):
        offer(li)
    while total[0] > goal:
        excess = total[0] - goal
        seen: list[tuple[float, float, float]] = []
        best: tuple[float, int, int] | None = None
        while heap and (not seen or heap[0][0] <= seen[0][0] * (1 + _NEAR)):
            k, de, ds = heapq.heappop(heap)
            members = groups[de, ds]
            while members and members[0][2] != version[members[0][0]]:
                heapq.heappop(members)
            if not members:
                del groups[de, ds]
                continue
            seen.append((k, de, ds))
            li, ri, _ = members[0]
            ratio = de / (ds / excess)  # the scan's own formula
            if best is None or (ratio, li, ri) < best:
                best = (ratio, li, ri)
        for entry in seen:
            heapq.heappush(heap, entry)
        if best is None:
            return False
        version[best[1]] += 1
        step(best[1], best[2], "->")
        offer(best[1])
    return True


def _fill_one(
    rows: list[list[_Rung]],
    at: list[int],
    total: list[float],
    goal: float,
    step: Callable[[int, int, str], None],
) -> None:
    """The slack pass with one budget, making the same moves as the scan in near-linear time.

    An upgrade's ratio does not depend on the total, only whether it fits does, and a rung that
    does not fit never fits again while the total does not fall. Each layer's upgrades are sorted
    best first (the scan's order: ratio, then rung) with a pointer past those found not to fit; a
    heap holds each layer's upgrade at its pointer, and its top, once found still to fit, is the
    scan's choice. A move that lowers the total moves every pointer back to the start.
    """
    version = [0] * len(rows)
    ups: list[list[tuple[float, int]]] = [[] for _ in rows]  # (-ratio, ri), best first
    ptr = [0] * len(rows)
    heap: list[tuple[float, int, int, int]] = []  # (-ratio, li, ri, version)

    def fits(li: int, ri: int) -> bool:
        return total[0] + rows[li][ri][0][0] - rows[li][at[li]][0][0] <= goal

    def rank(li: int) -> None:
        (cost,), err, _ = rows[li][at[li]]
        ups[li] = sorted(
            (-((err - e) / max((c - cost) / goal, 1e-12)), ri)
            for ri, ((c,), e, _) in enumerate(rows[li])
            if e < err
        )
        ptr[li] = 0

    def offer(li: int) -> None:  # the layer's best upgrade that still fits, if any
        while ptr[li] < len(ups[li]) and not fits(li, ups[li][ptr[li]][1]):
            ptr[li] += 1
        if ptr[li] < len(ups[li]):
            neg, ri = ups[li][ptr[li]]
            heapq.heappush(heap, (neg, li, ri, version[li]))

    for li in range(len(rows)):
        rank(li)
        offer(li)
    while heap:
        _, li, ri, ver = heapq.heappop(heap)
        if ver != version[li]:
            continue
        if not fits(li, ri):
            ptr[li] += 1
            offer(li)
            continue
        before = total[0]
        version[li] += 1
        step(li, ri, "up to")
        rank(li)
        if total[0] < before:  # cheaper upgrade: rungs passed over may fit again
            heap.clear()
            for other in range(len(rows)):
                ptr[other] = 0
                offer(other)
        else:
            offer(li)
