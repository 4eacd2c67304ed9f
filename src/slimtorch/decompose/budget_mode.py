"""Budget mode of ``decompose_``: ``rank="budget:params=0.33"``, ``"budget:flops=0.5"`` or both.

Instead of one rank rule for every layer, the targeted layers share one budget: the total
parameters (or per-sample FLOPs) of the targeted layers after factorisation must be at most the
given fraction of their total before. ``"budget:params=0.33,flops=0.5"`` asks for both at once:
in a CNN the parameters sit in the late wide layers and the FLOPs in the early large maps, so
one budget alone usually leaves the other far from its target. Kim et al. (2016, "Compression
of deep convolutional neural networks for fast and low power mobile applications",
arXiv:1511.06530) pick Tucker-2 ranks per
layer with VBMF (``rank="vbmf"`` here) and tune the overall compression to a target; budget mode
makes that target exact and spends it where it costs least accuracy.

For each targeted layer a ladder of options is built: the dense layer itself (ranks ``()``,
error 0) and every combination of ranks at the fractions :data:`LADDER_FRACTIONS` of each mode
(rounded to ``config.round_to``) that is cheaper than the dense layer and saves at least
``config.min_saving`` of its parameters. Each option's error is the relative Frobenius error of
the truncated decomposition, read off one full-rank decomposition: for Tucker-2, the full HOSVD
gives ``||W - W_r||^2 = ||W||^2 - ||core[:r_out, :r_in]||^2`` for every pair at once; for SVD the
tail sum of the squared singular values. (The layer finally built runs HOOI, whose error is at
most the HOSVD one.) Layers without a ladder (grouped convs, unsupported types) keep a single
dense option and are reported as skipped with the reason; their cost still counts.

The greedy rule (:func:`~slimtorch.decompose.budget.select_ranks_for_budget`): start every layer
at its most accurate option, then repeatedly take the single move to a cheaper option, over all
layers, with the least increase of weighted error per unit of cost saved, until the total meets
the target; then spend the slack the last move left, taking the upgrade (a more accurate option
that still fits) with the largest error decrease per cost added, until none fits. A layer's
weight is its ``sensitivity`` (e.g. from
:func:`~slimtorch.decompose.sensitivity.measure_sensitivity`), 1 for all layers when not given.

With ``config.min_speedup`` set, ``decompose_`` still times every layer the budget factorised and
keeps it dense when it is not faster: speed wins, and the report's totals then show the budget
missed by those layers.

New (config type, module type) pairs register a :class:`LadderKind` in :data:`LADDERS`.

Example:
    >>> options = tucker_options(nn.Conv2d(16, 16, 3), TuckerConfig(), None, 1)
    >>> options[0].ranks, options[0].error, len(options) > 10
    ((), 0.0, True)
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from slimtorch.core.registry import Registry
from slimtorch.decompose._shapes import Shapes, layer_flops
from slimtorch.decompose.budget import (
    BudgetSelection,
    LayerLadder,
    RankOption,
    select_ranks_for_budget,
)
from slimtorch.decompose.config import DecomposeConfig, SVDConfig, TuckerConfig
from slimtorch.decompose.handlers import (
    Factorised,
    SkipLayer,
    _plain,
    build_svd,
    build_tucker,
    count_params,
)
from slimtorch.decompose.layers._common import conv_out_hw
from slimtorch.decompose.linalg import leading_left_singular_vectors, unfold
from slimtorch.decompose.ranks import rank_from_fraction, round_rank

logger = logging.getLogger(__name__)

LADDER_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8, 1.0)
"""Fractions of each mode's size tried as ranks."""

OptionsFn = Callable[[nn.Module, DecomposeConfig, Shapes | None, int], list[RankOption]]
BuildFn = Callable[[nn.Module, DecomposeConfig, tuple[int, ...]], Factorised]


@dataclasses.dataclass(frozen=True)
class LadderKind:
    """How one (config type, module type) pair offers options and builds the chosen one.

    Attributes:
        options: ``options(module, config, shapes, batch)`` -> the ladder, dense option first.
        build: ``build(module, config, ranks)`` -> the factorised layer at those ranks.
    """

    options: OptionsFn
    build: BuildFn


LADDERS: Registry[LadderKind] = Registry("decompose budget ladder")


@dataclasses.dataclass(frozen=True)
class BudgetPlan:
    """The option chosen per layer, why layers had no ladder, and the budget figures."""

    choices: dict[str, RankOption]
    reasons: dict[str, str]
    metric: str
    total_before: float
    target: float
    selection: BudgetSelection


def mode_ranks(size: int, round_to: int = 1) -> list[int]:
    """Distinct ranks at :data:`LADDER_FRACTIONS` of ``size`` and the smallest rank (1, or
    ``round_to``), rounded, ascending: a tight budget can reach the cheapest form there is.

    Example:
        >>> mode_ranks(64, 8), mode_ranks(64)
        ([8, 16, 24, 32, 40, 48, 56, 64], [1, 4, 8, 16, 24, 32, 40, 48, 56, 64])
    """
    fractions = (*LADDER_FRACTIONS, 1 / size)
    ranks = {round_rank(rank_from_fraction(size, f), size, round_to) for f in fractions}
    return sorted(ranks)


def dense_option(module: nn.Module, shapes: Shapes | None, batch: int) -> RankOption:
    """The dense layer as a ladder option: ranks ``()``, error 0.

    Example:
        >>> dense_option(nn.Linear(4, 2), None, 1)
        RankOption(ranks=(), error=0.0, params=10, flops=16)
    """
    return RankOption((), 0.0, count_params(module), layer_flops(module, shapes, batch))


def _keep(option: RankOption, dense: RankOption, config: DecomposeConfig) -> bool:
    saving = 1.0 - option.params / dense.params if dense.params else 0.0
    cheaper = option.params < dense.params or (
        option.flops is not None and dense.flops is not None and option.flops < dense.flops
    )
    return cheaper and saving >= config.min_saving


def _bias(module: nn.Module) -> int:
    bias = getattr(module, "bias", None)
    return 0 if bias is None else bias.numel()


def tucker_options(
    conv: nn.Module, config: DecomposeConfig, shapes: Shapes | None, batch: int
) -> list[RankOption]:
    """Ladder of a plain ``nn.Conv2d`` under Tucker-2 (HOSVD truncation errors).

    Example:
        >>> opts = tucker_options(nn.Conv2d(8, 8, 3), TuckerConfig(), None, 1)
        >>> min(o.params for o in opts), opts[0].params
        (33, 584)
    """
    conv = _plain(conv, "TuckerConfig")
    dense = dense_option(conv, shapes, batch)
    w = conv.weight.detach().to(torch.float64)
    c_out, c_in = w.shape[:2]
    w3 = w.reshape(c_out, c_in, -1)  # (C_out, C_in, k)
    k = w3.shape[2]
    u_out = leading_left_singular_vectors(unfold(w3, 0), c_out)  # (C_out, C_out)
    u_in = leading_left_singular_vectors(unfold(w3, 1), c_in)  # (C_in, C_in)
    core = torch.einsum("oik,oa,ib->abk", w3, u_out, u_in)  # (C_out, C_in, k) full HOSVD core
    prefix = (core**2).sum(-1).cumsum(0).cumsum(1).cpu()  # (C_out, C_in) kept energy
    norm2 = float((w3**2).sum())
    hw = None
    if shapes is not None and len(shapes[0]) == 4:
        hw = (int(shapes[0][-2]), int(shapes[0][-1]))
        out_hw = conv_out_hw(conv, hw)
    options = [dense]
    # A mode's rank cannot exceed its unfolding's rank (C_out <= C_in k, C_in <= C_out k).
    outs = [r for r in mode_ranks(c_out, config.round_to) if r <= prefix.shape[0]]
    ins = [r for r in mode_ranks(c_in, config.round_to) if r <= prefix.shape[1]]
    for r_out in outs or [prefix.shape[0]]:
        for r_in in ins or [prefix.shape[1]]:
            kept = float(prefix[r_out - 1, r_in - 1])
            error = math.sqrt(max(norm2 - kept, 0.0) / norm2) if norm2 > 0 else 0.0
            params = c_in * r_in + r_in * r_out * k + r_out * c_out + _bias(conv)
            flops = None
            if hw is not None:
                flops = 2 * c_in * r_in * hw[0] * hw[1]  # first 1x1 at the input size
                flops += 2 * (r_in * r_out * k + r_out * c_out) * out_hw[0] * out_hw[1]
            option = RankOption((r_out, r_in), error, params, flops)
            if _keep(option, dense, config):
                options.append(option)
    return options


def svd_options(
    module: nn.Module, config: DecomposeConfig, shapes: Shapes | None, batch: int
) -> list[RankOption]:
    """Ladder of an ``nn.Linear`` or a plain 1x1 ``nn.Conv2d`` under truncated SVD.

    Example:
        >>> [o.ranks for o in svd_options(nn.Linear(16, 16), SVDConfig(), None, 1)][:3]
        [(), (1,), (2,)]
    """
    dense = dense_option(module, shapes, batch)
    if isinstance(module, nn.Linear):
        w = module.weight.detach()  # (out, in)
        per_rank = None if dense.flops is None else dense.flops // (w.shape[0] * w.shape[1])
    else:
        conv = _plain(module, "SVDConfig")
        if tuple(conv.kernel_size) != (1, 1):
            raise SkipLayer(
                f"SVDConfig handles 1x1 convs only, got kernel {tuple(conv.kernel_size)}; use "
                "TuckerConfig for spatial kernels"
            )
        w = conv.weight.detach()[:, :, 0, 0]  # (C_out, C_in)
        per_rank = None if dense.flops is None else dense.flops // (w.shape[0] * w.shape[1])
    s2 = torch.linalg.svdvals(w.to(torch.float64)).cpu() ** 2
    tail = s2.flip(0).cumsum(0).flip(0)  # tail[r] = sum of s_i^2 for i >= r
    total = float(s2.sum())
    full = min(w.shape)
    options = [dense]
    for r in mode_ranks(full, config.round_to):
        dropped = float(tail[r]) if r < full else 0.0
        error = math.sqrt(dropped / total) if total > 0 else 0.0
        params = r * (w.shape[0] + w.shape[1]) + _bias(module)
        flops = None if per_rank is None else per_rank * r * (w.shape[0] + w.shape[1])
        option = RankOption((r,), error, params, flops)
        if _keep(option, dense, config):
            options.append(option)
    return options


def _build_tucker(module: nn.Module, config: DecomposeConfig, ranks: tuple[int, ...]) -> Factorised:
    assert isinstance(config, TuckerConfig)
    return build_tucker(module, (ranks[0], ranks[1]), config)


def _build_svd(module: nn.Module, config: DecomposeConfig, ranks: tuple[int, ...]) -> Factorised:
    return build_svd(module, ranks[0])


LADDERS.add((TuckerConfig, nn.Conv2d), LadderKind(tucker_options, _build_tucker))
LADDERS.add((SVDConfig, nn.Conv2d), LadderKind(svd_options, _build_svd))
LADDERS.add((SVDConfig, nn.Linear), LadderKind(svd_options, _build_svd))


def find_ladder(config: DecomposeConfig, module: nn.Module) -> LadderKind:
    """The :class:`LadderKind` for ``(type(config), type(module))`` (searching the MRO).

    Raises:
        SkipLayer: none is registered (the reason lists what budget mode supports).
    """
    for cls in type(module).__mro__:
        if (type(config), cls) in LADDERS:
            return LADDERS.get((type(config), cls))
    supported = sorted(f"{k[0].__name__}/{k[1].__name__}" for k in LADDERS.names())  # type: ignore[index]
    raise SkipLayer(
        f"budget mode of {type(config).__name__} does not handle {type(module).__name__} layers "
        f"(it handles: {', '.join(supported)}); exclude the layer or use a fixed rank"
    )


def _weights(sensitivity: Mapping[str, float] | None, names: Sequence[str]) -> dict[str, float]:
    if sensitivity is None:
        return dict.fromkeys(names, 1.0)
    missing = [n for n in names if n not in sensitivity]
    if missing:
        raise ValueError(
            f"sensitivity lacks layer(s) {', '.join(missing)}; give a value for every layer that "
            "budget mode factorises (measure_sensitivity(model, names, ...) returns them all)"
        )
    values = {n: float(sensitivity[n]) for n in names}
    bad = [f"{n}={v}" for n, v in values.items() if not math.isfinite(v)]
    if bad:  # inf would outweigh every other layer's error; NaN compares with nothing
        raise ValueError(
            f"sensitivity must be a finite number for every layer, got {', '.join(bad)}; "
            "measure it again, or give the layer a large finite weight"
        )
    positive = [v for v in values.values() if v > 0]
    floor = 1e-3 * max(positive) if positive else 1.0  # a layer measured as harmless still costs
    return {n: v if v > 0 else floor for n, v in values.items()}


def plan_budget(
    targets: Sequence[tuple[str, nn.Module]],
    config: DecomposeConfig,
    shapes: Mapping[str, Shapes],
    batch: int,
    sensitivity: Mapping[str, float] | None = None,
    keep_dense: Mapping[str, str] | None = None,
) -> BudgetPlan:
    """Choose an option per targeted layer so the targeted total meets ``config``'s budget.

    Args:
        targets: ``(dotted name, module)`` of every targeted layer.
        config: A config whose ``rank`` is a budget spec.
        shapes: Recorded ``(input, output)`` shapes per layer (needed for a FLOPs budget).
        batch: Batch size of the recorded shapes.
        sensitivity: Error weight per layer (``None``: all 1); values ``<= 0`` (noise) are
            raised to a thousandth of the largest.
        keep_dense: Layers that must stay dense, with the reason (their cost still counts).

    Returns:
        A :class:`BudgetPlan`.

    Raises:
        ValueError: the spec is not a budget, FLOPs are unknown, a sensitivity is missing, or
            the target is below the cheapest total the ladders reach.

    Example:
        >>> net = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
        >>> plan = plan_budget(list(net.named_children()), SVDConfig(rank="budget:params=0.5"),
        ...     {}, 1)
        >>> sum(o.params for o in plan.choices.values()) <= plan.target
        True
    """
    spec = config.rank_spec
    if spec.kind != "budget" or spec.metric is None:
        raise ValueError(f"{type(config).__name__}.rank must be a budget spec, got {config.rank!r}")
    metrics = dict(spec.budgets or ((spec.metric, spec.value),))
    reasons: dict[str, str] = {}
    ladders: dict[str, list[RankOption]] = {}
    for name, module in targets:
        try:
            if keep_dense and name in keep_dense:
                raise SkipLayer(keep_dense[name])
            kind = find_ladder(config, module)
            if not all(bool(torch.isfinite(p).all()) for p in module.parameters()):
                raise SkipLayer("weights hold NaN/Inf; fix or re-initialise the layer first")
            ladders[name] = kind.options(module, config, shapes.get(name), batch)
        except SkipLayer as exc:
            reasons[name] = str(exc)
            ladders[name] = [dense_option(module, shapes.get(name), batch)]
        if "flops" in metrics and any(o.flops is None for o in ladders[name]):
            raise ValueError(
                f"a FLOPs budget needs per-sample FLOPs of layer {name!r}; pass example_input "
                "(one batch of real inputs) to decompose_, or use budget:params"
            )
    names = [n for n, opts in ladders.items() if len(opts) > 1]
    weights = _weights(sensitivity, names)
    layers = [
        LayerLadder(name, opts, sensitivity=weights.get(name, 1.0))
        for name, opts in ladders.items()
    ]

    def cost(option: RankOption, metric: str) -> float:
        return float(option.params if metric == "params" else option.flops or 0)

    totals = {m: sum(cost(opts[0], m) for opts in ladders.values()) for m in metrics}
    goals = {m: share * totals[m] for m, share in metrics.items()}
    try:
        selection = select_ranks_for_budget(layers, targets=goals)
    except ValueError as exc:
        wanted = " and ".join(f"{m} budget {goals[m]:,.0f} of {totals[m]:,.0f}" for m in metrics)
        dense = "".join(f"; {n} stays dense: {why}" for n, why in reasons.items())
        raise ValueError(
            f"{type(config).__name__}.rank {config.rank!r}: {wanted} cannot be met ({exc}){dense}"
        ) from None
    metric = next(iter(metrics))
    total, target = totals[metric], goals[metric]
    logger.info(
        "budget %s: %.4g of %.4g (target %.4g)", metric, selection.total_cost, total, target
    )
    return BudgetPlan(selection.choices, reasons, "+".join(metrics), total, target, selection)


def build_option(module: nn.Module, config: DecomposeConfig, option: RankOption) -> Factorised:
    """Build the chosen option (``SkipLayer`` when the budget kept the layer dense).

    Example:
        >>> build_option(nn.Linear(8, 8), SVDConfig(), RankOption((2,), 0.5, 32)).ranks
        [2]
    """
    if not option.ranks:
        raise SkipLayer(
            "budget kept the layer dense: the plan meets the budget by factorising other "
            "layers, at less estimated error (if a speed gate or build keeps those dense, "
            "the budget outcome says so)"
        )
    result = find_ladder(config, module).build(module, config, option.ranks)
    result.info = {**result.info, "budget_error_estimate": option.error}
    return result


__all__ = [
    "LADDERS",
    "LADDER_FRACTIONS",
    "BudgetPlan",
    "LadderKind",
    "build_option",
    "dense_option",
    "find_ladder",
    "mode_ranks",
    "plan_budget",
    "svd_options",
    "tucker_options",
]


def budget_outcome(plan: BudgetPlan, rows: Sequence[Any]) -> dict[str, Any]:
    """What the layers as built reach against the plan's target (its first metric), with a
    warning naming the planned layers that stayed dense when it is missed: a build that fails
    or a speed gate that keeps a layer dense can leave the budget unmet.

    ``rows`` are :class:`~slimtorch.decompose.transform.LayerReport` rows.
    """
    metric = plan.metric.split("+")[0]
    planned = {n for n, o in plan.choices.items() if o.ranks}
    mine = [r for r in rows if r.name in plan.choices or r.name in plan.reasons]
    field = "params_after" if metric == "params" else "flops_after"
    reached = float(sum(getattr(r, field) or 0 for r in mine))
    met = reached <= plan.target * (1 + 1e-9)
    if not met:
        dense = [f"{r.name} ({r.reason})" for r in mine if r.name in planned and not r.ranks]
        logger.warning(
            "budget %s missed: %.4g of %.4g against a target of %.4g; planned but kept dense: %s",
            metric, reached, plan.total_before, plan.target, "; ".join(dense) or "none",
        )  # fmt: skip
    return {"metric": metric, "total_before": plan.total_before, "target": plan.target,
            "planned": plan.selection.total_cost, "reached": reached, "met": met}  # fmt: skip
