"""``decompose_``: factorise a model's conv and linear layers in place, with a per-layer report.

Layers are chosen by dotted-name globs; each targeted layer gets a report row, decomposed or
skipped with its reason. What was done is recorded in ``model.slimtorch_arch["transforms"]`` so
:func:`rebuild_decomposed` can recreate the factorised shapes before loading saved weights.

Example:
    >>> net = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3))
    >>> report = decompose_(net, TuckerConfig(rank=0.25), include=["2"])
    >>> [(row.name, row.action) for row in report.rows]
    [('2', 'decomposed')]
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from slimtorch.core.errors import ModelLoadError, TransformSkipError
from slimtorch.decompose._surgery import set_submodule
from slimtorch.decompose.config import DecomposeConfig
from slimtorch.decompose.handlers import Factorised, SkipLayer, count_params, find_handler
from slimtorch.decompose.layers import LAYER_KINDS
from slimtorch.decompose.layers._common import conv_out_hw
from slimtorch.models.transforms import ARCH_TRANSFORMS

TRANSFORM_NAME = "decompose.layers"
"""Name of the architecture-transform entry; ``load_model`` replays it through the registry."""

logger = logging.getLogger(__name__)

_TARGET_TYPES = (nn.Linear, nn.modules.conv._ConvNd)


@dataclasses.dataclass
class LayerReport:
    """One targeted layer: what happened and what it cost.

    FLOPs are per sample (2 x multiply-adds, bias ignored); for convs they need ``example_input``
    (``None`` otherwise), for linear layers they count the rows seen per sample (1 without an
    example input).
    """

    name: str
    module_type: str
    action: str
    reason: str | None = None
    method: str | None = None
    ranks: list[int] | None = None
    params_before: int = 0
    params_after: int = 0
    flops_before: int | None = None
    flops_after: int | None = None
    rel_error: float | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class DecomposeReport:
    """Rows for every targeted layer, the config used, and the transform entry recorded."""

    method: str
    config: dict[str, Any]
    rows: list[LayerReport]
    entry: dict[str, Any] | None = None

    @property
    def decomposed(self) -> list[LayerReport]:
        """Rows with ``action == "decomposed"``."""
        return [r for r in self.rows if r.action == "decomposed"]

    @property
    def skipped(self) -> list[LayerReport]:
        """Rows with ``action == "skipped"``."""
        return [r for r in self.rows if r.action == "skipped"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: method, config, rows, totals and the recorded transform entry."""
        before = sum(r.params_before for r in self.rows)
        after = sum(r.params_after for r in self.rows)
        return {
            "method": self.method,
            "config": self.config,
            "layers": [dataclasses.asdict(r) for r in self.rows],
            "totals": {
                "params_before": before,
                "params_after": after,
                "decomposed": len(self.decomposed),
                "skipped": len(self.skipped),
            },
            "entry": self.entry,
        }

    def to_table(self) -> str:
        """A fixed-width text table, one line per layer."""

        def fmt(v: int | None) -> str:
            return "-" if v is None else f"{v:,}"

        head = ("layer", "action", "method", "ranks", "params", "flops", "rel_err", "reason")
        lines = [head]
        for r in self.rows:
            lines.append(
                (
                    r.name,
                    r.action,
                    r.method or "-",
                    "-" if r.ranks is None else "x".join(map(str, r.ranks)),
                    f"{fmt(r.params_before)} -> {fmt(r.params_after)}",
                    f"{fmt(r.flops_before)} -> {fmt(r.flops_after)}",
                    "-" if r.rel_error is None else f"{r.rel_error:.4f}",
                    r.reason or "",
                )
            )
        widths = [max(len(line[i]) for line in lines) for i in range(len(head) - 1)]
        return "\n".join(
            "  ".join(c.ljust(w) for c, w in zip(line[:-1], widths, strict=True)) + "  " + line[-1]
            for line in lines
        ).rstrip()


def _matches(name: str, include: Sequence[str] | None, exclude: Sequence[str] | None) -> bool:
    if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return not (exclude and any(fnmatch.fnmatchcase(name, p) for p in exclude))


def _targets(
    model: nn.Module, include: Sequence[str] | None, exclude: Sequence[str] | None
) -> list[tuple[str, nn.Module]]:
    factorised = tuple(LAYER_KINDS.get(k) for k in LAYER_KINDS.names())
    inside: list[str] = []
    out: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, factorised):
            inside.append(name)  # never re-factorise the parts of a factorised layer
            continue
        if isinstance(module, _TARGET_TYPES) and _matches(name, include, exclude):
            out.append((name, module))
    names = [n for n, _ in model.named_modules() if n]
    unmatched = [p for p in include or () if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise ValueError(
            f"include pattern(s) {', '.join(map(repr, unmatched))} match no module of "
            f"{type(model).__name__}; module names look like {', '.join(names[:6])}, ..."
        )
    return out


def _record_shapes(
    model: nn.Module, targets: list[tuple[str, nn.Module]], example_input: Any
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    hooks = []
    for name, module in targets:

        def hook(mod: nn.Module, args: tuple[Any, ...], out: Any, name: str = name) -> None:
            if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                shapes.setdefault(name, (tuple(args[0].shape), tuple(out.shape)))

        hooks.append(module.register_forward_hook(hook))
    modes = {m: m.training for m in model.modules()}
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    try:
        model.eval()
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes.items():
            m.train(training)
    return shapes


def _flops(
    module: nn.Module, shapes: tuple[tuple[int, ...], tuple[int, ...]] | None, batch: int
) -> int | None:
    """Per-sample FLOPs of ``module`` (original or factorised) given its recorded shapes."""
    kind = getattr(module, "flops_input", None)
    if isinstance(module, nn.Linear) or kind == "rows":
        rows = 1 if shapes is None else math.prod(shapes[1][:-1]) // max(batch, 1)
        if isinstance(module, nn.Linear):
            return 2 * module.in_features * module.out_features * rows
        return int(module.flops(rows))  # type: ignore[operator]
    if shapes is None or len(shapes[0]) < 3:
        return None
    in_hw = (int(shapes[0][-2]), int(shapes[0][-1]))
    if isinstance(module, nn.Conv2d):
        out_hw = conv_out_hw(module, in_hw)
        k = math.prod(module.kernel_size) * (module.in_channels // module.groups)
        return 2 * module.out_channels * k * out_hw[0] * out_hw[1]
    if kind == "hw":
        return int(module.flops(in_hw))  # type: ignore[operator]
    return None


def decompose_(
    model: nn.Module,
    config: DecomposeConfig,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    strict: bool = False,
    example_input: Any = None,
) -> DecomposeReport:
    """Factorise the targeted layers of ``model`` in place.

    Targets are the ``nn.Linear`` and conv modules whose dotted names match a glob of
    ``include`` (all when ``None``) and none of ``exclude`` (parts of already factorised layers
    are never targeted). The handler registered for ``(type(config), module type)`` does the work;
    a layer is skipped, untouched and with its reason, when no handler fits, its weights hold
    NaN/Inf, the factorisation would not save parameters, or the decomposition fails.

    Args:
        model: The model, changed in place.
        config: A :class:`~slimtorch.decompose.config.DecomposeConfig` subclass instance.
        include: Globs (``fnmatch``) of dotted module names to consider.
        exclude: Globs of names to leave alone.
        strict: Raise one :class:`~slimtorch.core.errors.TransformSkipError` naming every
            skipped layer and its reason; the model is then left unchanged.
        example_input: A tensor (or tuple of positional inputs) run once through the model, in
            eval mode without gradients, to record the spatial sizes the FLOP counts need.

    Returns:
        A :class:`DecomposeReport`.

    Raises:
        TypeError: ``config`` is not a ``DecomposeConfig``, or globs are not lists of strings.
        TransformSkipError: ``strict`` and at least one targeted layer was skipped.

    Example:
        >>> net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> decompose_(net, SVDConfig(rank=0.25), include=["0"]).rows[0].params_after
        2112
    """
    if not isinstance(config, DecomposeConfig):
        raise TypeError(
            f"config must be a DecomposeConfig (SVDConfig, TuckerConfig, CPConfig, TTConfig), got "
            f"{type(config).__name__}"
        )
    for arg, value in (("include", include), ("exclude", exclude)):
        if value is not None and (
            isinstance(value, str) or not all(isinstance(p, str) for p in value)
        ):
            raise TypeError(f"{arg} must be a list of glob strings or None, got {value!r}")
    targets = _targets(model, include, exclude)
    shapes = {} if example_input is None else _record_shapes(model, targets, example_input)
    batch = 1
    if example_input is not None:
        first = example_input[0] if isinstance(example_input, tuple) else example_input
        batch = int(first.shape[0]) if isinstance(first, torch.Tensor) and first.ndim else 1
    rows: list[LayerReport] = []
    replacements: dict[str, nn.Module] = {}
    for name, module in targets:
        before = count_params(module)
        row = LayerReport(
            name,
            type(module).__name__,
            "skipped",
            method=config.method,
            params_before=before,
            params_after=before,
            flops_before=_flops(module, shapes.get(name), batch),
        )
        row.flops_after = row.flops_before
        try:
            handler = find_handler(config, module)
            if not all(bool(torch.isfinite(p).all()) for p in module.parameters()):
                raise SkipLayer("weights hold NaN/Inf; fix or re-initialise the layer first")
            result: Factorised = handler(module, config, name)
        except SkipLayer as exc:
            row.reason = str(exc)
        except Exception as exc:  # a failed decomposition skips the layer, with the reason
            row.reason = f"decomposition failed: {type(exc).__name__}: {exc}"
        else:
            new = result.module.train(module.training)
            replacements[name] = new
            row.action, row.ranks, row.rel_error = "decomposed", result.ranks, result.rel_error
            row.params_after = count_params(new)
            row.flops_after = _flops(new, shapes.get(name), batch)
            row.info = result.info
        logger.info(
            "decompose %s: %s%s",
            name,
            row.action,
            f" ({row.reason})" if row.reason else f" ranks {row.ranks}",
        )
        rows.append(row)
    report = DecomposeReport(
        config.method, {"type": type(config).__name__, **config.to_dict()}, rows
    )
    skipped = report.skipped
    if strict and skipped:
        listing = "; ".join(f"{r.name}: {r.reason}" for r in skipped)
        raise TransformSkipError(
            f"decompose_ ({config.method}, strict) skipped {len(skipped)} layer(s), model left "
            f"unchanged: {listing}. Exclude these layers or change the config"
        )
    for name, new in replacements.items():
        set_submodule(model, name, new)
    if replacements:
        report.entry = {
            "name": TRANSFORM_NAME,
            "params": {
                "method": config.method,
                "config": report.config,
                "layers": {n: m.spec() for n, m in replacements.items()},  # type: ignore[operator]
            },
        }
        arch = getattr(model, "slimtorch_arch", None)
        if isinstance(arch, dict):
            arch.setdefault("transforms", []).append(report.entry)
    return report


def rebuild_decomposed(model: nn.Module, params: Mapping[str, Any]) -> nn.Module:
    """Recreate factorised layer shapes (randomly initialised) from a recorded entry's params.

    Use it on a freshly built model before ``load_state_dict`` of weights saved after
    :func:`decompose_`. Each new layer takes the device and dtype of the layer it replaces.

    Args:
        model: The freshly built (not yet decomposed) model, changed in place.
        params: ``entry["params"]`` of a ``{"name": "decompose.layers", ...}`` transform entry.

    Returns:
        ``model``.

    Raises:
        ModelLoadError: the entry is malformed or names a layer the model lacks.

    Example:
        >>> net = nn.Sequential(nn.Linear(64, 64))
        >>> report = decompose_(net, SVDConfig(rank=0.25))
        >>> fresh = rebuild_decomposed(nn.Sequential(nn.Linear(64, 64)), report.entry["params"])
        >>> type(fresh[0]).__name__
        'LowRankLinear'
    """
    layers = params.get("layers") if isinstance(params, Mapping) else None
    if not isinstance(layers, Mapping):
        raise ModelLoadError(
            "decompose entry has no 'layers' mapping; expected {'layers': {name: spec}} as "
            "recorded by decompose_; re-save the model"
        )
    for name, spec in layers.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ModelLoadError(
                f"decompose entry names layer {name!r}, which this model lacks; build the same "
                "architecture that was decomposed"
            ) from None
        kind = spec.get("kind") if isinstance(spec, Mapping) else None
        if kind not in LAYER_KINDS:
            raise ModelLoadError(
                f"layer {name!r} has unknown factorised kind {kind!r}; known kinds: "
                f"{', '.join(map(str, LAYER_KINDS.names()))}"
            )
        ref = next(old.parameters(), None)
        device = None if ref is None else ref.device
        dtype = None if ref is None else ref.dtype
        cls = LAYER_KINDS.get(kind)
        new = cls.from_spec(dict(spec), device=device, dtype=dtype)  # type: ignore[attr-defined]
        set_submodule(model, name, new.train(old.training))
    return model


def _replay_decomposed(model: nn.Module, params: dict[str, Any]) -> None:
    rebuild_decomposed(model, params)


ARCH_TRANSFORMS.add(TRANSFORM_NAME, _replay_decomposed)
