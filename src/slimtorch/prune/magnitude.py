"""``prune_``: unstructured magnitude and N:M pruning of conv and linear layers, in place.

Each pruned parameter gets a ``bool`` buffer beside it (``<module>.weight_mask``, and
``<module>.bias_mask`` with ``include_bias``) and is set to ``+0.0`` where the mask is ``False``
(``masked_fill``, so no ``-0.0`` that compact storage would keep). The masks are part of the
state dict, so a :class:`~slimtorch.prune.callbacks.MaskCallback` keeps pruned weights at zero
through fine-tuning, checkpoints carry them, and ``save_model``/``load_model`` round-trip them
(the ``"prune.masks"`` architecture transform re-adds the buffers before the weights load).
:func:`remove_masks_` makes pruning permanent: the buffers go, the zeros stay.

Magnitude pruning follows Han et al. 2015 (arXiv:1506.02626); N:M follows Mishra et al. 2021
(arXiv:2104.08378). Unstructured zeros save bytes once stored compactly
(:mod:`slimtorch.prune.storage`), not time on dense kernels; 2:4 can run faster on sparse
tensor cores (NVIDIA Ampere and later), not on the RX 580.

Example:
    >>> net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> report = prune_(net, MagnitudeConfig(sparsity=0.5))
    >>> [(r.name, r.action, r.zeros_after) for r in report.rows]
    [('0', 'pruned', 128), ('2', 'pruned', 32)]
    >>> net[0].weight_mask.dtype
    torch.bool
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from slimtorch.core.config import Config, check_bool, check_choice, check_range
from slimtorch.core.errors import TransformSkipError
from slimtorch.core.globs import check_globs as _check_globs
from slimtorch.core.globs import check_include_hits, selected, untargeted_layers
from slimtorch.core.measure.params import stored_weights_reason, weight_buffer_layers
from slimtorch.core.surgery import require_values
from slimtorch.models.transforms import record_transform
from slimtorch.prune.buffers import TRANSFORM_NAME, get_mask, set_mask_
from slimtorch.prune.masks import global_magnitude_masks, magnitude_mask, nm_mask
from slimtorch.prune.report import PruneReport, PruneRow

logger = logging.getLogger(__name__)

_TARGET_TYPES = (nn.Conv2d, nn.Linear)


def _check_int(obj: object, name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{type(obj).__name__}.{name} must be an integer >= {low}, got {value!r}")
    check_range(obj, name, value, low=low)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MagnitudeConfig(Config):
    """Unstructured magnitude pruning.

    Attributes:
        sparsity: Fraction of the targeted weights set to zero, in [0, 1). ``0`` only adds
            all-``True`` masks (useful before resuming a gradually pruned run).
        scope: ``"layer"`` (each layer loses exactly ``sparsity``) or ``"global"`` (one
            magnitude threshold across all targeted layers; the total is exact).
        include_bias: Prune biases too (rarely worth it: they are few and sensitive).
        min_params: Skip layers with fewer weights than this (>= 0).

    Example:
        >>> MagnitudeConfig(sparsity=0.9, scope="global").to_dict()["scope"]
        'global'
    """

    sparsity: float = 0.5
    scope: str = "layer"
    include_bias: bool = False
    min_params: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, int | float):
            raise ValueError(f"MagnitudeConfig.sparsity must be a number, got {self.sparsity!r}")
        check_range(self, "sparsity", self.sparsity, low=0.0, high=1.0, high_inclusive=False)
        check_choice(self, "scope", self.scope, ("layer", "global"))
        check_bool(self, "include_bias", self.include_bias)
        _check_int(self, "min_params", self.min_params, 0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class NMConfig(Config):
    """N:M semi-structured pruning: keep ``n`` of every ``m`` consecutive input weights.

    Attributes:
        n: Weights kept per group, ``1 <= n < m``.
        m: Group size (>= 2); layers whose input dimension is not divisible by it are skipped.

    Example:
        >>> NMConfig(n=2, m=4).to_dict()
        {'n': 2, 'm': 4}
    """

    n: int = 2
    m: int = 4

    def __post_init__(self) -> None:
        _check_int(self, "m", self.m, 2)
        _check_int(self, "n", self.n, 1)
        check_range(self, "n", self.n, low=1, high=self.m, high_inclusive=False)


PruneConfig = MagnitudeConfig | NMConfig


def _targets(
    model: nn.Module,
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
    stored: dict[str, Any],
) -> list[tuple[str, nn.Module]]:
    """The selected conv/linear layers, and the selected quantized ones in ``stored`` (which
    :func:`prune_` reports skipped)."""
    _check_globs(model, include, exclude, "prune_")
    out: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not name or not (isinstance(module, _TARGET_TYPES) or name in stored):
            continue
        if not selected(name, include, exclude):
            continue
        out.append((name, module))
    check_include_hits(model, include, [name for name, _ in out], "nn.Conv2d/nn.Linear")
    others = untargeted_layers(model, include, exclude)
    if others and model not in _WARNED:  # once per model: gradual pruning calls this often
        _WARNED.add(model)
        logger.warning("prune_ prunes nn.Conv2d/nn.Linear only; left dense: %s", ", ".join(others))
    return out


_WARNED: weakref.WeakSet[nn.Module] = weakref.WeakSet()

_SUMMARY_LEVEL: contextvars.ContextVar[int] = contextvars.ContextVar(
    "prune_summary_level", default=logging.INFO
)


@contextlib.contextmanager
def summary_at_debug() -> Iterator[None]:
    """Within it, :func:`prune_` logs its one-line summary at debug level: for a caller that
    logs the same counts itself (:class:`~slimtorch.prune.callbacks.GradualPruning`)."""
    token = _SUMMARY_LEVEL.set(logging.DEBUG)
    try:
        yield
    finally:
        _SUMMARY_LEVEL.reset(token)


def _zeros(t: torch.Tensor) -> int:
    return int((t == 0).sum())


def _scores(module: nn.Module, param: str) -> torch.Tensor:
    """The parameter with already pruned entries at zero (they are pruned first)."""
    p = getattr(module, param).detach()
    old = get_mask(module, param)
    return p if old is None else torch.where(old, p, torch.zeros_like(p))


def _skip_reason(module: nn.Module, params: Sequence[str], config: PruneConfig) -> str | None:
    for param in params:
        if param not in module._parameters:  # recomputed on every call: a mask would not hold
            return (
                f"{param} is computed from other tensors (a parametrization, weight norm or "
                "torch.nn.utils.prune), not a parameter; remove that first"
            )
    for param in params:
        p = getattr(module, param)
        if not p.is_floating_point():
            return f"{param} is {p.dtype}, not floating point"
        if not bool(torch.isfinite(p).all()):
            return f"{param} holds {'NaN' if bool(torch.isnan(p).any()) else 'Inf'} values"
    w: torch.Tensor = getattr(module, "weight")  # noqa: B009  (typed as a tensor)
    if isinstance(config, MagnitudeConfig) and w.numel() < config.min_params:
        return f"{w.numel()} weights < min_params {config.min_params}"
    if isinstance(config, NMConfig):
        if w.dim() < 2:
            return f"weight has shape {tuple(w.shape)}; N:M needs an input dimension"
        if w.shape[1] % config.m:
            return (
                f"input dimension (dim 1) of weight {tuple(w.shape)} has size {w.shape[1]}, "
                f"not divisible by m={config.m}"
            )
    return None


def prune_(
    model: nn.Module,
    config: PruneConfig,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    strict: bool = False,
) -> PruneReport:
    """Prune the ``nn.Conv2d`` and ``nn.Linear`` weights of ``model`` in place.

    Targets are the layers whose dotted names match a glob of ``include`` (all when ``None``)
    and none of ``exclude``; a glob that matches no module, or an ``include`` glob that selects
    no conv/linear layer, raises. A layer is skipped, untouched and with its reason, when its
    weights hold NaN/Inf, are not floating point or are stored quantized (an int8 layer), it has
    fewer than ``min_params`` weights, or (N:M) its input dimension is not divisible by ``m``.
    Pruning an already pruned layer only adds zeros: new masks are combined with the old ones.

    Args:
        model: The model, changed in place.
        config: :class:`MagnitudeConfig` or :class:`NMConfig`.
        include: Globs (``fnmatch``) of dotted module names to consider.
        exclude: Globs of names to leave alone.
        strict: Raise one :class:`~slimtorch.core.errors.TransformSkipError` naming every
            skipped layer and its reason; the model is then left unchanged.

    Returns:
        A :class:`PruneReport`.

    Raises:
        TypeError: ``config`` is not a prune config, or the globs are not lists of strings.
        ValueError: a glob matches no module, or an ``include`` glob selects no layer.
        TransformSkipError: ``strict`` and at least one targeted layer was skipped.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> prune_(net, NMConfig(n=2, m=4), include=["0"]).rows[0].zeros_after
        32
    """
    require_values(model, "prune_")
    check_bool("prune_", "strict", strict)
    if not isinstance(config, MagnitudeConfig | NMConfig):
        raise TypeError(
            f"config must be a MagnitudeConfig or NMConfig, got {type(config).__name__}"
        )
    method = "magnitude" if isinstance(config, MagnitudeConfig) else f"nm{config.n}:{config.m}"
    with_bias = isinstance(config, MagnitudeConfig) and config.include_bias
    rows: list[PruneRow] = []
    chosen: list[tuple[nn.Module, list[str], PruneRow]] = []
    stored = weight_buffer_layers(model)
    owners: dict[int, str] = {}  # weight tensor -> the first layer that holds it (tied weights)
    for name, module in _targets(model, include, exclude, stored):
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and id(weight) in owners:
            reason = f"its weight is {owners[id(weight)]}'s (tied): pruned there, counted there"
            rows.append(PruneRow(name, type(module).__name__, "tied", reason))
            continue
        if isinstance(weight, torch.Tensor):
            owners[id(weight)] = name
        if name in stored:
            _, count, dtype, _ = stored[name]
            reason = stored_weights_reason(module, dtype, "prune")
            rows.append(PruneRow(name, type(module).__name__, "skipped", reason, params=count))
            continue
        params = ["weight"] + (["bias"] if with_bias and module.bias is not None else [])
        tensors = [getattr(module, p) for p in params]
        zeros = sum(_zeros(t) for t in tensors)
        row = PruneRow(
            name,
            type(module).__name__,
            "skipped",
            params=sum(t.numel() for t in tensors),
            zeros_before=zeros,
            zeros_after=zeros,
        )
        row.reason = _skip_reason(module, params, config)
        if row.reason is None:
            row.action = "pruned"
            chosen.append((module, params, row))
        rows.append(row)
    report = PruneReport(method, {"type": type(config).__name__, **config.to_dict()}, rows)
    if strict and report.skipped:
        listing = "; ".join(f"{r.name}: {r.reason}" for r in report.skipped)
        raise TransformSkipError(
            f"prune_ ({method}, strict) skipped {len(report.skipped)} layer(s), model left "
            f"unchanged: {listing}. Exclude these layers or change the config"
        )
    masks: dict[tuple[int, str], torch.Tensor] = {}
    if isinstance(config, NMConfig):
        for i, (module, _, _) in enumerate(chosen):
            masks[i, "weight"] = nm_mask(_scores(module, "weight"), config.n, config.m, dim=1)
    elif config.scope == "global" and chosen:
        pool = {f"{i}:{p}": _scores(mod, p) for i, (mod, ps, _) in enumerate(chosen) for p in ps}
        for key, mask in global_magnitude_masks(pool, config.sparsity).items():
            idx, p = key.split(":")
            masks[int(idx), p] = mask
    else:
        for i, (module, params, _) in enumerate(chosen):
            for p in params:
                masks[i, p] = magnitude_mask(_scores(module, p), config.sparsity)
    layers, biases = [], []
    names = {id(m): n for n, m in model.named_modules()}
    for i, (module, params, row) in enumerate(chosen):
        for p in params:
            set_mask_(module, p, masks[i, p])
        row.zeros_after = sum(_zeros(getattr(module, p)) for p in params)
        weight = getattr(module, "weight")  # noqa: B009 (mypy reads module.weight as Tensor | Module)
        emptied = _zeros(weight) == weight.numel()
        if emptied and row.zeros_after > row.zeros_before:
            per_layer = isinstance(config, MagnitudeConfig) and config.scope == "global"
            logger.warning(  # a global threshold can take all of a layer with small weights
                "prune_: every weight of %s is now zero, so its output no longer depends on "
                "its input; lower the sparsity%s or exclude it",
                row.name, ", prune per layer (scope='layer')" if per_layer else "",
            )  # fmt: skip
        layers.append(names[id(module)])
        if "bias" in params:
            biases.append(names[id(module)])
    for row in rows:  # the report has every row; the log only a summary unless debugging
        logger.debug(
            "prune %s: %s%s",
            row.name,
            row.action,
            f" ({row.reason})" if row.reason else f", sparsity {row.sparsity:.3f}",
        )
    # a call that zeroes nothing new (masks installed at sparsity 0 for sparse training, a
    # target already reached) says so at debug level only
    zeroed = any(r.zeros_after > r.zeros_before for r in rows)
    logger.log(
        _SUMMARY_LEVEL.get() if zeroed else logging.DEBUG,
        "prune_ (%s): %d layer(s) pruned, %d skipped; %d of %d weights zero",
        method, len(chosen), len(rows) - len(chosen),
        sum(r.zeros_after for r in rows), sum(r.params for r in rows),
    )  # fmt: skip
    if layers and isinstance(getattr(model, "slimtorch_arch", None), dict):
        params_rec: dict[str, Any] = {"layers": layers}
        if biases:
            params_rec["bias"] = biases
        entries = getattr(model, "slimtorch_arch").get("transforms", [])  # noqa: B009
        if {"name": TRANSFORM_NAME, "params": params_rec} not in entries:  # re-pruning: once
            record_transform(model, TRANSFORM_NAME, params_rec)
        report.entry = {"name": TRANSFORM_NAME, "params": params_rec}
    return report
