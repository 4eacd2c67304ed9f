"""``prune_channels_``: remove whole channels so the layers really shrink, in place.

Steps: build the channel dependency graph (:mod:`.graph`), choose the targeted groups by the
include/exclude globs, score their channels (:mod:`.importance`), pick how many each keeps
(per group or one global threshold, rounded to ``round_to``), slice every member layer to the
kept channels (:mod:`.layers`), and check that the pruned model still runs on the example input,
in eval and in train mode, with outputs of the same shape and finite values (:mod:`.check`). If
that check fails every layer is put back and :class:`~.graph.ChannelGraphError` is raised, so a
broken model is never returned. The result is an ordinary dense model; the kept widths are
recorded as the ``"prune.channels"`` architecture transform so ``save_model``/``load_model``
round-trip it.

Example:
    >>> net = nn.Sequential(nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), nn.ReLU(),
    ...                     nn.Conv2d(32, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 4))
    >>> report = prune_channels_(net, ChannelPruneConfig(ratio=0.5), torch.randn(2, 3, 5, 5))
    >>> [(r.name, r.channels_before, r.channels_after, r.action) for r in report.rows]
    [('0', 32, 16, 'pruned'), ('3', 16, 8, 'pruned'), ('6', 4, 4, 'fixed')]
    >>> net[3]
    Conv2d(16, 8, kernel_size=(3, 3), stride=(1, 1))
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from slimtorch.core.config import check_bool
from slimtorch.core.devices import keeps_rng, kept_rng
from slimtorch.core.errors import TransformSkipError
from slimtorch.core.globs import check_globs as _check_globs
from slimtorch.core.globs import check_include_hits, selected
from slimtorch.core.measure import count_flops, count_params
from slimtorch.core.measure.params import stored_weights_reason, weight_buffer_layers
from slimtorch.core.surgery import (
    kept_modes,
    nonfinite_tensors,
    parameter_sharing,
    require_float32,
    require_values,
)
from slimtorch.models.transforms import record_transform
from slimtorch.prune.channel.check import check_nm_masks, reference_outputs, swap_and_check
from slimtorch.prune.channel.config import ChannelPruneConfig, round_channels
from slimtorch.prune.channel.graph import ChannelGraph, ChannelGraphError, ChannelGroup, build_graph
from slimtorch.prune.channel.importance import LossFn, calibration_error, channel_scores
from slimtorch.prune.channel.layers import (
    TRANSFORM_NAME,
    layer_widths,
    slice_layer,
    unknown_tensors,
)
from slimtorch.prune.channel.report import ChannelGroupRow, ChannelPruneReport

logger = logging.getLogger(__name__)

_LAYER_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


def _match(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _row(
    group: ChannelGroup,
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
    model: nn.Module,
    shared_with: Callable[[str], list[str]],
) -> ChannelGroupRow | None:
    if include is not None and not any(_match(p, include) for p in group.producers):
        return None
    row = ChannelGroupRow(
        group.name, group.producers, group.members, group.size, group.size, None, "skipped"
    )
    # exclude keeps every layer whose output channels the group is, not only its producers
    excluded = [p for p in group.writers or group.producers if exclude and _match(p, exclude)]
    extra = {n: unknown_tensors(model.get_submodule(n)) for n in group.members}
    extra = {n: t for n, t in extra.items() if t}
    nonfinite = [  # buffers too: a NaN batch-norm running_var
        f"{n}.{t}"
        for n in group.members
        for t in nonfinite_tensors(model.get_submodule(n), recurse=False)
    ]
    tied = {n: shared for n in group.members if (shared := shared_with(n))}
    if group.fixed:
        row.action = "fixed"
        row.reason = f"{'; '.join(group.fixed)}: its channel count cannot change"
    elif group.blocked:
        row.reason = "; ".join(group.blocked)
    elif excluded:
        row.reason = f"coupled layer(s) {', '.join(excluded)} excluded by exclude="
    elif tied:
        row.reason = "; ".join(
            f"{n} shares {', '.join(t)} (tied weights), which slicing would untie"
            for n, t in tied.items()
        )
    elif extra:
        row.reason = "; ".join(f"{n} holds tensors {t} that slicing does not know" for n, t in
                               extra.items())  # fmt: skip
    elif nonfinite:
        row.reason = (
            f"{', '.join(nonfinite)} hold NaN/Inf values, so channel importance is undefined; "
            "fix the weights or running statistics, or exclude these layers"
        )
    else:
        row.action = "unchanged"
    return row


def _group_ratio(group: ChannelGroup, config: ChannelPruneConfig) -> float | None:
    for pattern, ratio in (config.layer_ratios or {}).items():
        if any(fnmatch.fnmatchcase(p, pattern) for p in group.producers):
            return float(ratio)
    return None


def _check_layer_ratios(
    model: nn.Module, config: ChannelPruneConfig, producers: Sequence[str]
) -> None:
    """Raise ``ValueError`` when a ``layer_ratios`` glob matches no channel-producing layer (a
    typo must not silently prune that layer at the default ratio), as ``exclude=`` does."""
    missed = [p for p in config.layer_ratios or {} if not _match_any(producers, p)]
    if not missed:
        return
    names = [n for n, _ in model.named_modules() if n]
    hits = [f"{n} ({type(model.get_submodule(n)).__name__})" for n in names if _match(n, missed)]
    found = f"they match only {', '.join(hits[:6])}" if hits else "they match no module at all"
    raise ValueError(
        f"ChannelPruneConfig.layer_ratios pattern(s) {', '.join(map(repr, missed))} match no "
        f"channel-producing conv/linear layer of {type(model).__name__} ({found}); such layers "
        f"are named like {', '.join(list(producers)[:6])}, ..."
    )


def _match_any(names: Sequence[str], pattern: str) -> bool:
    return any(fnmatch.fnmatchcase(n, pattern) for n in names)


def _select(scores: torch.Tensor, keep: int, blocks: int) -> torch.Tensor:
    """Indices (sorted) of the ``keep`` best channels, ``keep / blocks`` in each block."""
    n = scores.numel()
    per_block, k = n // blocks, keep // blocks
    chosen = []
    for b in range(blocks):
        s = scores[b * per_block : (b + 1) * per_block]
        chosen.append(torch.argsort(-s, stable=True)[:k] + b * per_block)
    return torch.sort(torch.cat(chosen)).values


def _plan(
    groups: list[ChannelGroup],
    scores: dict[int, tuple[torch.Tensor, str]],
    config: ChannelPruneConfig,
) -> tuple[dict[int, int], dict[int, float]]:
    """Channels each group keeps, and the ratio aimed at."""
    for g in groups:
        s, used = scores[g.root]
        if not bool(torch.isfinite(s).all()):
            raise calibration_error(
                f"channel importance {used!r} gave NaN/Inf scores for group {g.name!r} (layers "
                f"{', '.join(g.members)}), so which channels to keep is undefined; the model is "
                "unchanged. Check the calibration data and these layers' weights, or exclude them"
            )
    counts: dict[int, int] = {}
    target: dict[int, float] = {}
    pool = []
    for g in groups:
        r = _group_ratio(g, config)
        # a group scored by a fallback ("bn_scale" without a BatchNorm: l1) is pruned locally:
        # its scores are on another scale than the rest of the pool's
        if r is None and config.scope == "global" and scores[g.root][1] == config.importance:
            pool.append(g)
            continue
        r = config.ratio if r is None else r
        target[g.root] = r
        counts[g.root] = g.size - math.floor(g.size * r + 1e-9)
    if pool:
        normed = []
        for g in pool:
            s, used = scores[g.root]
            if used.startswith(("l1", "l2")) and s.mean() > 0:
                s = s / s.mean()
            normed.append(s)
        allv = torch.cat(normed)
        remove = math.floor(config.ratio * allv.numel() + 1e-9)
        owner = torch.cat([torch.full((g.size,), i) for i, g in enumerate(pool)])
        lowest = owner[torch.argsort(allv, stable=True)[:remove]]
        removed = torch.bincount(lowest, minlength=len(pool)).tolist()
        for g, r in zip(pool, removed, strict=True):
            cap = math.floor(g.size * config.max_layer_ratio + 1e-9)
            counts[g.root] = g.size - min(int(r), cap)
            target[g.root] = config.ratio
    for g in groups:
        try:
            counts[g.root] = round_channels(
                counts[g.root],
                g.size,
                round_to=config.round_to,
                min_channels=config.min_channels,
                blocks=g.blocks,
            )
        except ValueError as exc:
            raise ValueError(f"group {g.name!r} (layers {', '.join(g.members)}): {exc}") from None
    return counts, target


def _new_layers(
    model: nn.Module, graph: ChannelGraph, keep: dict[int, torch.Tensor]
) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {}
    spaces = graph.spaces
    for name, use in graph.layers.items():
        touched = spaces.roots_of(use.out_space)
        if use.in_space is not None:
            touched |= spaces.roots_of(use.in_space)
        if not touched & keep.keys():
            continue
        in_idx = None if use.in_space is None else spaces.indices(use.in_space, keep)
        try:
            out[name] = slice_layer(
                model.get_submodule(name), in_idx, spaces.indices(use.out_space, keep), name
            )
        except (ValueError, TypeError, RuntimeError) as exc:
            raise ChannelGraphError(
                f"slicing {name!r} failed ({exc}); the model is unchanged. Exclude the groups "
                "that touch this layer"
            ) from exc
    return out


def _unseen_rows(
    model: nn.Module,
    graph: ChannelGraph,
    example_input: Any,
    include: Any,
    exclude: Any,
    reported: set[str],
) -> list[ChannelGroupRow]:
    """Skip rows for selected conv/linear layers the forward calls but the traced graph never
    saw as layers: inside a module torch.fx cannot trace (kept as one opaque call), or a class
    the graph does not slice (a QAT layer, a fused kernel's factors). Without them the report
    said nothing of them. Layers the forward never calls get no row."""
    seen = set(graph.layers) | {m for g in graph.groups for m in g.members} | reported
    unseen = {
        name: module
        for name, module in model.named_modules()
        if name not in seen
        and isinstance(module, _LAYER_TYPES)
        and selected(name, include, exclude)
    }
    if not unseen:
        return []
    called: set[str] = set()
    hooks = [m.register_forward_pre_hook(lambda *_, n=n: called.add(n)) for n, m in unseen.items()]
    try:
        with torch.no_grad(), kept_modes(model), kept_rng():
            model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for name, module in unseen.items():
        if name in called:
            out = getattr(module, "out_channels", getattr(module, "out_features", 0))
            reason = (
                f"{type(module).__name__} is not a layer of the traced graph (inside a module "
                "torch.fx cannot trace, or a class the graph does not slice); left as it is"
            )
            rows.append(ChannelGroupRow(name, [name], [name], out, out, None, "skipped", reason))
    return rows


@keeps_rng  # the narrowed layers' own initial weights are overwritten
def prune_channels_(
    model: nn.Module,
    config: ChannelPruneConfig,
    example_input: Any,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    strict: bool = False,
    calibration: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
) -> ChannelPruneReport:
    """Remove the least important channels of ``model``'s conv/linear layers, in place.

    A group (channels coupled through residual adds, concatenations, depthwise convs, batch
    norms and flatten) is targeted when one of its producing layers matches a glob of
    ``include`` (all when ``None``). It is skipped, with the reason, when ``exclude`` matches
    a layer whose output channels it is (see ``exclude`` below), when its channels reach an op
    the graph does not resolve (named in the reason), when a member holds tensors slicing does
    not know or is quantized (int8), or when a member's weights or running statistics hold
    NaN/Inf (the channel scores would be meaningless). Channels of the model's input and output
    (the classifier's outputs) are ``fixed``: never pruned.

    Args:
        model: The model, changed in place (layers are replaced by smaller ones; rebuild
            any optimizer afterwards).
        config: A :class:`ChannelPruneConfig`.
        example_input: A tensor (or tuple of positional inputs) on the model's device: used
            for tracing, FLOP counts and the final forward check.
        include: Dotted-name globs of layers whose output channels may be pruned.
        exclude: Globs of layers whose output channels must stay: a group is kept whole when
            a glob matches any layer whose output channels (batch-norm features) the group
            is, that is its producers and the batch norms and depthwise convs that carry its
            channels on. A layer that only reads the group (the next conv, whose input side
            would shrink) does not keep it: exclude that layer's own output channels only.
        strict: Raise one :class:`~slimtorch.core.errors.TransformSkipError` naming every
            skipped group; the model is then left unchanged.
        calibration: ``(inputs, targets)`` batches for ``importance="taylor"``.
        loss_fn: ``loss_fn(outputs, targets)`` for Taylor; cross-entropy when ``None``.

    Returns:
        A :class:`~.report.ChannelPruneReport`.

    Raises:
        TypeError: ``config`` is not a ``ChannelPruneConfig`` or the globs are not lists.
        ValueError: a glob matches no module, an ``include`` or ``config.layer_ratios`` glob
            selects no layer that produces channels; Taylor without calibration batches; a
            layer whose input would be cut holds an N:M weight mask (channel-prune first,
            then apply N:M).
        CalibrationError: Taylor and a calibration batch gives a NaN/Inf loss or gradients,
            or any channel scores are NaN/Inf (the model is unchanged).
        ChannelGraphError: the model cannot be traced (in train or eval mode), or the pruned
            model failed its check in either mode (it is restored).
        TransformSkipError: ``strict`` and a targeted group was skipped.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 2))
        >>> report = prune_channels_(net, ChannelPruneConfig(ratio=0.75), torch.randn(4, 8))
        >>> net[0].out_features, report.to_dict()["totals"]["params_after"]
        (16, 178)
    """
    require_values(model, "prune_channels_")
    check_bool("prune_channels_", "strict", strict)
    require_float32(model, "prune_channels_", "prune channels, then cast", also=(torch.float64,))
    if not isinstance(config, ChannelPruneConfig):
        raise TypeError(f"config must be a ChannelPruneConfig, got {type(config).__name__}")
    _check_globs(model, include, exclude, "prune_channels_")
    graph = build_graph(model, example_input)
    producers = [p for g in graph.groups for p in g.producers]
    check_include_hits(model, include, producers, "channel-producing conv/linear")
    _check_layer_ratios(model, config, producers)
    ref = reference_outputs(model, example_input)
    params_before = count_params(model)
    flops_before = count_flops(model, example_input).total_flops
    rows: list[ChannelGroupRow] = []
    targets: list[ChannelGroup] = []
    shared_with = parameter_sharing(model)
    for group in graph.groups:
        row = _row(group, include, exclude, model, shared_with)
        if row is None:
            continue
        rows.append(row)
        if row.action == "unchanged":
            targets.append(group)
    for name, (module, _, dtype, channels) in weight_buffer_layers(model).items():
        if selected(name, include, exclude):  # quantized: its channels cannot be sliced here
            reason = stored_weights_reason(module, dtype, "channel-prune")
            rows.append(ChannelGroupRow(name, [name], [name], channels, channels, None,
                                        "skipped", reason))  # fmt: skip
    rows += _unseen_rows(model, graph, example_input, include, exclude, {r.name for r in rows})
    config_dict = {"type": type(config).__name__, **config.to_dict()}
    skipped = [r for r in rows if r.action == "skipped"]
    if strict and skipped:
        listing = "; ".join(f"{r.name}: {r.reason}" for r in skipped)
        raise TransformSkipError(
            f"prune_channels_ (strict) skipped {len(skipped)} group(s), model left unchanged: "
            f"{listing}. Exclude these layers or make their ops traceable"
        )
    by_root = {r.name: r for r in rows}
    keep: dict[int, torch.Tensor] = {}
    if targets and (config.ratio > 0 or config.layer_ratios):
        scores = channel_scores(
            model,
            graph,
            targets,
            config.importance,
            calibration=calibration,
            loss_fn=loss_fn,
            max_batches=config.calibration_batches,
        )
        counts, aimed = _plan(targets, scores, config)
        for g in targets:
            row = by_root[g.name]
            row.importance, row.ratio = scores[g.root][1], aimed[g.root]
            row.channels_after = counts[g.root]
            if counts[g.root] < g.size:
                keep[g.root] = _select(scores[g.root][0], counts[g.root], g.blocks)
                row.action = "pruned"
            else:
                row.reason = f"keeps all {g.size} channels after rounding to {config.round_to}"
    for row in rows:
        if row.action == "unchanged" and row.reason is None:
            row.reason = "ratio 0"
    new = _new_layers(model, graph, keep)
    if new:
        check_nm_masks(model, new)
        swap_and_check(model, new, example_input, ref)
    report = ChannelPruneReport(
        config_dict,
        rows,
        params_before,
        count_params(model),
        flops_before,
        count_flops(model, example_input).total_flops if new else flops_before,
    )
    if new:
        params = {"layers": {name: layer_widths(m) for name, m in new.items()}}
        report.entry = {"name": TRANSFORM_NAME, "params": params}
        if isinstance(getattr(model, "slimtorch_arch", None), dict):
            record_transform(model, TRANSFORM_NAME, params)
    for row in rows:  # the report's table has every row: the log only when debugging
        logger.debug(
            "prune channels %s: %s %d -> %d%s",
            row.name,
            row.action,
            row.channels_before,
            row.channels_after,
            f" ({row.reason})" if row.reason else "",
        )
    return report
