"""Channel importance per group: L1/L2 filter norm, batch-norm scale, first-order Taylor.

Each criterion scores the channels of a group from every layer that writes them (the
producing convs/linears, depthwise convs and batch norms of the group):

* ``"l1"`` / ``"l2"``: the norm of each output filter (Li, Kadav, Durdanovic, Samet & Graf,
  2017, "Pruning Filters for Efficient ConvNets", arXiv:1608.08710). Each layer's scores are
  divided by their mean before the group averages them, so a layer of large weights does not
  drown the others in a residual group.
* ``"bn_scale"``: ``|gamma|`` of the group's batch norms (network slimming: Liu, Li, Shen,
  Huang, Yan & Zhang, 2017, arXiv:1708.06519). A group without a batch norm falls back to
  ``"l1"``, and the report says so.
* ``"taylor"``: first-order Taylor estimate of the loss change when a channel is removed,
  ``(sum over the channel's parameters of grad * weight)^2``, summed over the group's layers
  before squaring and averaged over calibration batches (Molchanov, Mallya, Tyree, Frosio &
  Kautz, 2019, "Importance Estimation for Neural Network Pruning", arXiv:1906.10771).

Example:
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> graph = build_graph(net, torch.randn(2, 4))
    >>> with torch.no_grad():
    ...     _ = net[0].weight.copy_(torch.tensor([[1.0] * 4, [3.0] * 4, [2.0] * 4]))
    >>> scores = channel_scores(net, graph, graph.groups[:1], "l1")
    >>> scores[graph.groups[0].root][0].tolist()
    [0.5, 1.5, 1.0]
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.core.surgery import kept_modes
from slimtorch.prune.channel.graph import ChannelGraph, ChannelGroup, LayerUse

logger = logging.getLogger(__name__)

IMPORTANCES = ("l1", "l2", "bn_scale", "taylor")
"""The importance criteria :func:`channel_scores` knows."""

LossFn = Callable[[Any, Any], torch.Tensor]


def _reduce_rows(t: torch.Tensor, p: int, chunk: int = 256) -> torch.Tensor:
    """Per-row L1 or L2 norm of ``t`` summed in float64, ``chunk`` rows at a time: a float64
    copy of a whole 4096 x 25088 weight took 1.5 GB to produce 4096 numbers."""
    flat = t.detach().reshape(t.shape[0], -1)  # (C_out, rest)
    parts = []
    for rows in flat.split(chunk):
        rows = rows.double()
        parts.append(rows.abs().sum(1) if p == 1 else rows.square().sum(1).sqrt())
    return torch.cat(parts) if parts else flat.new_zeros(0, dtype=torch.float64)


def calibration_error(message: str) -> Exception:
    """A :class:`~slimtorch.quant.lsq.CalibrationError` (imported here: ``slimtorch.prune``
    does not import ``slimtorch.quant`` otherwise)."""
    from slimtorch.quant.lsq import CalibrationError

    return CalibrationError(message)


def _nonfinite(batch: int, what: str) -> Exception:
    return calibration_error(
        f"taylor importance: calibration batch {batch} gives {what}, so the channel scores would "
        "be NaN/Inf and which channels are kept arbitrary; the model is unchanged. Remove or "
        "clean that batch (check its inputs and targets for NaN/Inf), or use importance 'l1', "
        "'l2' or 'bn_scale'"
    )


def _writers(model: nn.Module, graph: ChannelGraph, roots: set[int]) -> list[LayerUse]:
    return [u for u in graph.layers.values() if graph.spaces.roots_of(u.out_space) & roots]


def _norm_scores(
    model: nn.Module, graph: ChannelGraph, roots: set[int], p: int, bn_only: bool
) -> tuple[dict[int, torch.Tensor], dict[int, int]]:
    total: dict[int, torch.Tensor] = {}
    count: dict[int, int] = {}
    for use in _writers(model, graph, roots):
        module = model.get_submodule(use.name)
        if (use.kind == "bn") != bn_only:
            continue
        if use.kind == "bn":
            gamma = getattr(module, "weight", None)
            if not isinstance(gamma, torch.Tensor):
                continue
            values = gamma.detach().abs().double()
        else:
            values = _reduce_rows(module.weight, p)  # type: ignore[arg-type]
            mean = values.mean()
            values = values / mean if mean > 0 else values
        for root, v in graph.spaces.scatter(use.out_space, values.cpu()):
            if root in roots:
                total[root] = total.get(root, 0) + v
                count[root] = count.get(root, 0) + 1
    return {r: total[r] / count[r] for r in total}, count


def _taylor(
    model: nn.Module,
    graph: ChannelGraph,
    roots: set[int],
    calibration: Iterable[Any],
    loss_fn: LossFn,
    max_batches: int | None,
) -> dict[int, torch.Tensor]:
    uses = _writers(model, graph, roots)
    pairs: list[tuple[LayerUse, list[torch.Tensor]]] = []
    for use in uses:
        module = model.get_submodule(use.name)
        tensors = [getattr(module, n, None) for n in ("weight", "bias")]
        pairs.append((use, [t for t in tensors if isinstance(t, nn.Parameter)]))
    params = [p for _, ps in pairs for p in ps]
    flags = [p.requires_grad for p in params]
    scores: dict[int, torch.Tensor] = {}
    batches = 0
    with kept_modes(model):
        try:
            for p in params:
                p.requires_grad_(True)
            for batch in calibration:
                if max_batches is not None and batches >= max_batches:
                    break
                if not isinstance(batch, Sequence) or len(batch) < 2:
                    raise ValueError(
                        "calibration must yield (inputs, targets) batches, got "
                        f"{type(batch).__name__}; pass e.g. a DeviceLoader over training data"
                    )
                inputs, targets = batch[0], batch[1]
                with torch.enable_grad():
                    args = inputs if isinstance(inputs, tuple) else (inputs,)
                    loss = loss_fn(model(*args), targets)
                    if not bool(torch.isfinite(loss.detach()).all()):
                        raise _nonfinite(batches, f"a NaN/Inf loss ({loss.detach().tolist()})")
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                grad_of = {id(p): g for p, g in zip(params, grads, strict=True)}
                step: dict[int, torch.Tensor] = {}
                for use, ps in pairs:
                    t: torch.Tensor | None = None
                    for p in ps:
                        g = grad_of[id(p)]
                        if g is None:
                            continue
                        row = (g.detach() * p.detach()).double().reshape(p.shape[0], -1).sum(1)
                        t = row if t is None else t + row
                    if t is None:
                        continue
                    if not bool(torch.isfinite(t).all()):
                        raise _nonfinite(batches, f"NaN/Inf gradients in layer {use.name}")
                    for root, v in graph.spaces.scatter(use.out_space, t.cpu()):
                        if root in roots:
                            step[root] = step.get(root, 0) + v
                for root, v in step.items():
                    scores[root] = scores.get(root, 0) + v.pow(2)
                    if not bool(torch.isfinite(scores[root]).all()):
                        raise _nonfinite(batches, "scores that overflow float64")
                batches += 1
        finally:
            for p, flag in zip(params, flags, strict=True):
                p.requires_grad_(flag)
    if batches == 0:
        raise ValueError(
            "taylor importance got no calibration batches; pass calibration= an iterable of "
            "(inputs, targets) batches (a few hundred samples are enough)"
        )
    return {r: v / batches for r, v in scores.items()}


def channel_scores(
    model: nn.Module,
    graph: ChannelGraph,
    groups: Sequence[ChannelGroup],
    method: str,
    *,
    calibration: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    max_batches: int | None = None,
) -> dict[int, tuple[torch.Tensor, str]]:
    """Score the channels of ``groups`` (higher = more important).

    Args:
        model: The model the graph was built from.
        graph: Its :class:`~slimtorch.prune.channel.graph.ChannelGraph`.
        groups: The groups to score.
        method: One of :data:`IMPORTANCES`.
        calibration: ``(inputs, targets)`` batches; required by ``"taylor"``.
        loss_fn: ``loss_fn(outputs, targets)``; cross-entropy when ``None``.
        max_batches: Use at most this many calibration batches.

    Returns:
        Root id -> (float64 CPU scores of the group's channels, criterion actually used).

    Raises:
        ValueError: Unknown ``method``, or ``"taylor"`` without calibration batches.
        CalibrationError: ``"taylor"`` and a calibration batch gives a NaN/Inf loss or
            gradients (the message names the batch); nothing is changed.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
        >>> graph = build_graph(net, torch.randn(1, 3, 4, 4))
        >>> scores = channel_scores(net, graph, graph.groups[:1], "bn_scale")
        >>> scores[graph.groups[0].root][1]
        'bn_scale'
    """
    if method not in IMPORTANCES:
        raise ValueError(f"importance must be one of {', '.join(IMPORTANCES)}, got {method!r}")
    roots = {g.root for g in groups}
    out: dict[int, tuple[torch.Tensor, str]] = {}
    if method == "taylor":
        if calibration is None:
            raise ValueError(
                "importance='taylor' needs calibration= (inputs, targets) batches to compute "
                "gradients; pass a data loader or choose 'l1', 'l2' or 'bn_scale'"
            )
        scores = _taylor(model, graph, roots, calibration, loss_fn or F.cross_entropy, max_batches)
        for g in groups:
            out[g.root] = (scores.get(g.root, torch.zeros(g.size, dtype=torch.float64)), method)
        return out
    if method == "bn_scale":
        scores, _ = _norm_scores(model, graph, roots, 1, bn_only=True)
        missing = roots - set(scores)
        for r, v in scores.items():
            out[r] = (v, method)
        if missing:
            l1, _ = _norm_scores(model, graph, missing, 1, bn_only=False)
            for r, v in l1.items():
                out[r] = (v, "l1 (no BatchNorm in group)")
    else:
        p = 1 if method == "l1" else 2
        for r, v in _norm_scores(model, graph, roots, p, bn_only=False)[0].items():
            out[r] = (v, method)
    for g in groups:
        out.setdefault(g.root, (torch.zeros(g.size, dtype=torch.float64), method))
    return out
