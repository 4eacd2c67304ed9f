"""The heap-based greedy in select_ranks_for_budget makes exactly the scan's moves, and scales."""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import pytest

from slimtorch.decompose import budget
from slimtorch.decompose.budget import (
    BudgetSelection,
    CostFn,
    LayerLadder,
    RankOption,
    select_ranks_for_budget,
)

logger = logging.getLogger(__name__)


def reference_select(
    layers: Sequence[LayerLadder],
    *,
    target: float | None = None,
    metric: Literal["params", "flops"] = "params",
    cost_fn: CostFn | None = None,
    targets: Mapping[str, float] | None = None,
) -> BudgetSelection:
    """The selection rule as first written: every move rescans every layer and rung."""
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


def same(new: BudgetSelection, old: BudgetSelection) -> None:
    assert list(new.choices) == list(old.choices)
    for name, option in old.choices.items():  # the same rung, even among duplicates
        assert new.choices[name] is option, name
    assert new.total_cost == old.total_cost and new.total_error == old.total_error
    assert new.target == old.target


def outcome(select: Callable[..., BudgetSelection], layers: list[LayerLadder], kw: dict) -> Any:
    try:
        return select(layers, **kw)
    except ValueError as exc:
        return str(exc)


def random_ladder(rng: random.Random, name: str, style: str, n: int) -> LayerLadder:
    options = []
    mult = rng.choice([1, 2, 3, 5, 7, 9])
    rise, run = (mult * k for k in rng.choice([(1, 3), (1, 2), (2, 3), (1, 7), (3, 10)]))
    for ri in range(n):
        if style == "linear":  # every move has the same error per cost: near-ties everywhere
            error, params, flops = rise * ri, 2000 - run * ri, 3000 - (rise + run) * ri
        elif style == "int":  # many exact and float-rounding ties
            error: float = rng.randint(0, 6)
            params, flops = rng.randint(1, 12), rng.randint(1, 12)
        elif style == "tenths":
            error = rng.randint(0, 9) / 10
            params, flops = rng.randint(1, 30), rng.randint(1, 30) * 7
        elif style == "float":
            error = rng.random()
            params, flops = rng.randint(1, 10**6), rng.randint(1, 10**9)
        else:  # tucker-like: cost grows, error falls with the rank
            frac = (ri + 1) / n
            error = (1 - frac) ** 2 * rng.uniform(0.5, 1.5)
            params, flops = int(5000 * frac) + 1, int(80000 * frac * rng.uniform(0.8, 1.2)) + 1
        options.append(RankOption((ri,), error, params, flops))
    for _ in range(rng.choice([0, 0, 1, 3])):  # duplicate rungs, equal values or the same object
        twin = rng.choice(options)
        options.insert(
            rng.randrange(len(options) + 1), rng.choice([twin, dataclasses.replace(twin)])
        )
    sensitivity = rng.choice([1.0, 1.0, 2.0, 3.0, 0.1, rng.uniform(0.01, 10.0)])
    cost_fn = None
    if rng.random() < 0.1:  # a per-layer cost model
        cost_fn = lambda _n, o: o.params * 0.5 + 1.0  # noqa: E731
    return LayerLadder(name, options, sensitivity, cost_fn)


def random_target(rng: random.Random, layers: list[LayerLadder], cost: Callable) -> float:
    low = sum(min(cost(layer, o) for o in layer.options) for layer in layers)
    high = sum(max(cost(layer, o) for o in layer.options) for layer in layers)
    target = low + rng.uniform(-0.05, 1.1) * (high - low)
    if rng.random() < 0.5:
        target = round(target)
    return max(target, 0.5)


def random_case(rng: random.Random) -> tuple[list[LayerLadder], dict]:
    style = rng.choice(["int", "int", "linear", "linear", "tenths", "float", "tucker"])
    max_rungs = rng.randint(1, 20)
    layers = [
        random_ladder(rng, f"l{i}", style, rng.randint(1, max_rungs))
        for i in range(rng.randint(1, 60))
    ]
    mode = rng.choice(["params", "params", "flops", "cost_fn", "two", "two"])
    if mode == "two":
        keys = rng.choice([["params", "flops"], ["flops", "params"]])
        targets = {k: random_target(rng, layers, lambda _l, o, k=k: getattr(o, k)) for k in keys}
        return layers, {"targets": targets}
    if mode == "cost_fn":
        scale = rng.choice([1.0, 0.37, 3.0])
        fn = lambda name, o: o.params * scale + len(name)  # noqa: E731
        cost = lambda layer, o: (layer.cost_fn or fn)(layer.name, o)  # noqa: E731
        return layers, {"target": random_target(rng, layers, cost), "cost_fn": fn}
    cost = lambda layer, o: (  # noqa: E731
        layer.cost_fn(layer.name, o) if layer.cost_fn else getattr(o, mode)
    )
    return layers, {"target": random_target(rng, layers, cost), "metric": mode}


@pytest.mark.parametrize("chunk", range(6))
def test_same_selection_as_the_scan_on_random_ladders(chunk: int) -> None:
    rng = random.Random(chunk)
    for case in range(40):
        layers, kw = random_case(rng)
        new, old = (
            outcome(select_ranks_for_budget, layers, kw),
            outcome(reference_select, layers, kw),
        )
        if isinstance(old, str):
            assert new == old, (chunk, case)
        else:
            assert isinstance(new, BudgetSelection), (chunk, case, new)
            same(new, old)


Rows = list[list[tuple[tuple[float, ...], float, RankOption]]]
Moves = list[tuple[int, int, str]]


def scan_passes(rows: Rows, at: list[int], goal: float) -> tuple[Moves, bool]:
    """Both passes of the scan with one budget, from any state; the moves made, and if stuck."""
    total = [sum(rows[li][ri][0][0] for li, ri in enumerate(at))]
    moves: Moves = []

    def move(li: int, ri: int, what: str) -> None:
        total[0] += rows[li][ri][0][0] - rows[li][at[li]][0][0]
        at[li] = ri
        moves.append((li, ri, what))

    while total[0] > goal:
        best: tuple[float, int, int] | None = None
        for li, rungs in enumerate(rows):
            cost, err, _ = rows[li][at[li]]
            for ri, rung in enumerate(rungs):
                gain = sum(max(cost[i] - rung[0][i], 0.0) / (total[i] - goal) for i in [0])
                if gain <= 0 or rung[0][0] > cost[0]:
                    continue
                ratio = max(rung[1] - err, 0.0) / gain
                if best is None or ratio < best[0]:
                    best = (ratio, li, ri)
        if best is None:
            return moves, True
        move(best[1], best[2], "->")
    while True:
        up: tuple[float, int, int] | None = None
        for li, rungs in enumerate(rows):
            cost, err, _ = rows[li][at[li]]
            for ri, rung in enumerate(rungs):
                fits = total[0] + rung[0][0] - cost[0] <= goal
                if rung[1] < err and fits:
                    added = sum((rung[0][i] - cost[i]) / goal for i in [0])
                    ratio = (err - rung[1]) / max(added, 1e-12)
                    if up is None or ratio > up[0]:
                        up = (ratio, li, ri)
        if up is None:
            return moves, False
        move(up[1], up[2], "up to")


def heap_passes(rows: Rows, at: list[int], goal: float) -> tuple[Moves, bool]:
    total = [sum(rows[li][ri][0][0] for li, ri in enumerate(at))]
    moves: Moves = []

    def step(li: int, ri: int, what: str) -> None:
        total[0] += rows[li][ri][0][0] - rows[li][at[li]][0][0]
        at[li] = ri
        moves.append((li, ri, what))

    if not budget._shrink_one(rows, at, total, goal, step):
        return moves, True
    budget._fill_one(rows, at, total, goal, step)
    return moves, False


@pytest.mark.parametrize("chunk", range(4))
def test_passes_match_the_scan_from_any_state(chunk: int) -> None:
    """From any rung per layer (dominated ones too: free moves, upgrades that save cost)."""
    rng = random.Random(100 + chunk)
    for case in range(60):
        style = rng.choice(["int", "linear", "tenths", "float"])
        layers = [
            random_ladder(rng, f"l{i}", style, rng.randint(1, 12))
            for i in range(rng.randint(1, 30))
        ]
        rows: Rows = [
            sorted(
                (((float(o.params),), layer.sensitivity * o.error, o) for o in layer.options),
                key=lambda t: (t[1], t[0]),
            )
            for layer in layers
        ]
        at = [rng.randrange(len(r)) for r in rows]
        low = sum(min(t[0][0] for t in r) for r in rows)
        now = sum(r[ri][0][0] for r, ri in zip(rows, at, strict=True))
        goal = max(low + rng.uniform(-0.1, 1.2) * (now - low), 0.5)
        assert heap_passes(rows, list(at), goal) == scan_passes(rows, list(at), goal), (chunk, case)


def test_float_rounding_decides_a_tie_as_in_the_scan() -> None:
    # Both moves cost 1 error per 3 saved, but with an excess of 5 the scan's float ratios are
    # 1 / (3 / 5) = 1.6666666666666667 and 3 / (9 / 5) = 1.6666666666666665: b moves, not a.
    a = LayerLadder("a", [RankOption((2,), 0.0, 10), RankOption((1,), 1.0, 7)])
    b = LayerLadder("b", [RankOption((2,), 0.0, 20), RankOption((1,), 3.0, 11)])
    old = reference_select([a, b], target=25)
    assert (old.choices["a"].ranks, old.choices["b"].ranks) == ((2,), (1,))
    same(select_ranks_for_budget([a, b], target=25), old)


def test_identical_layers_break_ties_by_order() -> None:
    rng = random.Random(7)
    options = [RankOption((r,), rng.randint(0, 5), rng.randint(1, 40)) for r in range(15)]
    layers = [LayerLadder(f"l{i}", options) for i in range(40)]
    low, high = (40 * f(o.params for o in options) for f in (min, max))
    for target in range(low, high + 1, (high - low) // 7):
        same(
            select_ranks_for_budget(layers, target=target), reference_select(layers, target=target)
        )


def tucker_ladders(rng: random.Random, n_layers: int) -> list[LayerLadder]:
    """Tucker-2-like ladders: the dense layer, then 7 x 14 rank pairs (99 rungs)."""
    layers = []
    for i in range(n_layers):
        c_out, c_in = rng.choice([64, 128, 256]), rng.choice([64, 128, 256])
        options = [RankOption((), 0.0, c_out * c_in * 9)]
        for r_out in range(c_out // 7, c_out + 1, c_out // 7)[:7]:
            for r_in in range(c_in // 14, c_in + 1, c_in // 14)[:14]:
                kept = (r_out / c_out) ** 0.5 * (r_in / c_in) ** 0.5
                error = math.sqrt(max(1 - kept, 0.0)) * rng.uniform(0.9, 1.1)
                options.append(
                    RankOption((r_out, r_in), error, c_in * r_in + 9 * r_in * r_out + r_out * c_out)
                )
        layers.append(LayerLadder(f"layer{i}.conv", options, rng.uniform(0.5, 2.0)))
    return layers


def test_tucker_like_ladders_match_the_scan() -> None:
    # its speed at scale is measured by scripts/bench_scale.py (docs/benchmarks.md)
    layers = tucker_ladders(random.Random(0), 60)
    dense = sum(layer.options[0].params for layer in layers)
    for fraction in (0.3, 0.6):
        target = fraction * dense
        same(
            select_ranks_for_budget(layers, target=target), reference_select(layers, target=target)
        )
