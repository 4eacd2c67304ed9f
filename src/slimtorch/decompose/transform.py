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
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from slimtorch.core import surgery
from slimtorch.core.config import check_bool
from slimtorch.core.devices import keeps_rng
from slimtorch.core.errors import ModelLoadError, TransformSkipError
from slimtorch.core.globs import check_globs, check_include_hits, selected
from slimtorch.core.measure.params import stored_weights_reason, weight_buffer_layers
from slimtorch.core.surgery import replacement_blockers, require_float32, set_submodule
from slimtorch.core.table import text_table
from slimtorch.decompose import prefactor
from slimtorch.decompose._shapes import layer_flops, record_shapes
from slimtorch.decompose.budget_mode import BudgetPlan, budget_outcome, build_option, plan_budget
from slimtorch.decompose.config import CPConfig, DecomposeConfig, TuckerConfig
from slimtorch.decompose.finite import checked, prefactor_tucker
from slimtorch.decompose.handlers import (
    Factorised,
    SkipLayer,
    batch_request,
    count_params,
    cp_options,
    find_handler,
)
from slimtorch.decompose.layers import LAYER_KINDS
from slimtorch.decompose.model_gate import check_speed_request, model_gate
from slimtorch.decompose.speed import layer_speedup
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
    example input). The latency fields are filled when ``config.min_speedup`` is set: the
    original and the factorised layer's time (seconds per call at ``speed_batch``), their ratio
    and where the figures come from (``"measured:cpu"``, ``"roofline:rx580"``).
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
    latency_before_s: float | None = None
    latency_after_s: float | None = None
    speedup: float | None = None
    speed_source: str | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class DecomposeReport:
    """Rows for every targeted layer, the config used, and the transform entry recorded."""

    method: str
    config: dict[str, Any]
    rows: list[LayerReport]
    entry: dict[str, Any] | None = None
    budget: dict[str, Any] | None = None  # a budget rank spec: target, reached, met

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
        return {
            "method": self.method,
            "config": self.config,
            "layers": [dataclasses.asdict(r) for r in self.rows],
            "totals": {
                "params_before": sum(r.params_before for r in self.rows),
                "params_after": sum(r.params_after for r in self.rows),
                "decomposed": len(self.decomposed),
                "skipped": len(self.skipped),
            },
            "entry": self.entry,
            "budget": self.budget,
        }

    def to_table(self) -> str:
        """A fixed-width text table, one line per layer."""

        def fmt(v: int | None) -> str:
            return "-" if v is None else f"{v:,}"

        head: tuple[str, ...] = ("layer", "action", "method", "ranks", "params", "flops")
        head += ("rel_err", "speedup", "reason")
        lines: list[tuple[str, ...]] = [head]
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
                    "-" if r.speedup is None else f"{r.speedup:.2f}x",
                    r.reason or "",
                )
            )
        b, tail = self.budget, ""
        if b is not None:
            tail = f"\nbudget {b['metric']}: {b['reached']:,.0f} of {b['total_before']:,.0f} "
            tail += f"(target {b['target']:,.0f}): {'met' if b['met'] else 'MISSED'}"
        return text_table(lines) + tail


def _targets(
    model: nn.Module, include: Sequence[str] | None, exclude: Sequence[str] | None
) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    factorised = tuple(LAYER_KINDS.get(k) for k in LAYER_KINDS.names())
    inside: list[str] = []
    parts: list[str] = []  # a glob naming one is answered by its layer's skip row
    out: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            parts.append(name)
        elif name and isinstance(module, factorised):
            inside.append(name)  # never re-factorise the parts of a factorised layer
        elif name and isinstance(module, _TARGET_TYPES) and selected(name, include, exclude):
            out.append((name, module))
    check_globs(model, include, exclude, "decompose_")
    check_include_hits(model, include, [n for n, _ in out] + inside + parts, "nn.Conv2d/nn.Linear")
    return out, inside  # and the layers factorised before


@keeps_rng  # the factorised layers' own initial weights are overwritten
def decompose_(
    model: nn.Module,
    config: DecomposeConfig,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    strict: bool = False,
    example_input: Any = None,
    sensitivity: Mapping[str, float] | None = None,
) -> DecomposeReport:
    """Factorise the targeted layers of ``model`` in place.

    Targets are the ``nn.Linear`` and conv modules whose dotted names match a glob of
    ``include`` (all when ``None``) and none of ``exclude`` (parts of already factorised layers
    are never targeted). The handler registered for ``(type(config), module type)`` does the work;
    a layer is skipped, untouched and with its reason, when no handler fits, its weights hold
    NaN/Inf, are stored quantized (an int8 layer) or are shared with another module (tied
    weights), its parent reads its weight directly (``nn.MultiheadAttention.out_proj``, the
    linear layers of ``nn.TransformerEncoderLayer``), the factorisation would not save
    parameters, or the decomposition fails.

    With a budget rank spec (``"budget:params=0.33"``) the ranks of all targeted layers are chosen
    together so their total meets the budget (see :mod:`slimtorch.decompose.budget_mode`). With
    ``config.min_speedup`` set, each factorised layer is timed against the original on its real
    input shape (:func:`~slimtorch.decompose.speed.layer_speedup`) and the original is kept,
    with a ``"not faster"`` skip, where the speed-up falls short; with ``speed_scope="model"``
    the whole model is timed with and without each factorised layer instead
    (:func:`~slimtorch.decompose.model_gate.model_gate`).

    Args:
        model: The model, changed in place.
        config: A :class:`~slimtorch.decompose.config.DecomposeConfig` subclass instance.
        include: Globs (``fnmatch``) of dotted module names to consider.
        exclude: Globs of names to leave alone.
        strict: Raise one :class:`~slimtorch.core.errors.TransformSkipError` naming every
            skipped layer and its reason; the model is then left unchanged.
        example_input: A tensor (or tuple of positional inputs) run once through the model, in
            eval mode without gradients, to record each layer's input and output shapes (for
            FLOP counts, FLOPs budgets and speed checks). Required with ``min_speedup``.
        sensitivity: Budget mode only: error weight per layer name (e.g. from
            :func:`~slimtorch.decompose.sensitivity.measure_sensitivity`).

    Returns:
        A :class:`DecomposeReport`.

    Raises:
        TypeError: ``config`` is not a ``DecomposeConfig``, or globs are not lists of strings.
        ValueError: ``min_speedup`` without ``example_input``, ``sensitivity`` without a budget,
            a budget that cannot be met, an ``include``/``exclude`` glob that matches no module,
            or targeted layers on the meta device.
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
    check_bool("decompose_", "strict", strict)
    for arg, value in (("include", include), ("exclude", exclude)):
        if value is not None and (
            isinstance(value, str) or not all(isinstance(p, str) for p in value)
        ):
            raise TypeError(f"{arg} must be a list of glob strings or None, got {value!r}")
    check_speed_request(model, config, example_input)
    budget = config.rank_spec.kind == "budget"
    if sensitivity is not None and not budget:
        raise ValueError(
            f"sensitivity weights only a budget rank spec, but {type(config).__name__}.rank is "
            f"{config.rank!r}; use rank='budget:params=<x>' or drop sensitivity"
        )
    targets, done = _targets(model, include, exclude)
    if not any(p.is_meta for p in model.parameters()):
        require_float32(model, "decompose_", "factorise, then cast", also=(torch.float64,))
    meta = [n for n, m in targets if any(p.is_meta for p in m.parameters())]
    if meta:
        raise ValueError(
            f"decompose_ needs weight values, but layer(s) {', '.join(meta)} hold meta-device "
            "tensors (shapes only); load the real weights first (e.g. model.to_empty(device="
            "'cpu') then load_state_dict) or exclude those layers"
        )
    blocked = replacement_blockers(model, targets)
    work = [(n, m) for n, m in targets if n not in blocked]
    shapes = {} if example_input is None else record_shapes(model, targets, example_input)
    batch = 1
    if example_input is not None:
        first = example_input[0] if isinstance(example_input, tuple) else example_input
        batch = int(first.shape[0]) if isinstance(first, torch.Tensor) and first.ndim else 1
    plan = plan_budget(targets, config, shapes, batch, sensitivity, blocked) if budget else None
    rows: list[LayerReport] = []
    replacements: dict[str, nn.Module] = {}
    with prefactor.batch_results(_prefactor(work, config, plan)):
        _factorise_all(targets, config, plan, shapes, batch, rows, replacements, blocked)
    skips = {n: (m, c, stored_weights_reason(m, d, "factorise"))  # quantized: say so
             for n, (m, c, d, _) in weight_buffer_layers(model).items()}  # fmt: skip
    for name in done:  # factorised before: its parts are never factorised again
        module = model.get_submodule(name)
        why = f"already factorised ({type(module).__name__}); decompose the original layer"
        skips[name] = (module, count_params(module), why)
    for name, (module, count, reason) in skips.items():
        parts = [n for n, _ in module.named_modules(prefix=name)]  # include: it or a part
        if selected(name, None, exclude) and any(selected(n, include, None) for n in parts):
            rows.append(LayerReport(name, type(module).__name__, "skipped", reason,
                                    params_before=count, params_after=count))  # fmt: skip
    if config.min_speedup is not None and config.speed_scope == "model" and replacements:
        model_gate(model, replacements, rows, config, example_input)
    report = DecomposeReport(
        config.method, {"type": type(config).__name__, **config.to_dict()}, rows
    )
    report.budget = None if plan is None else budget_outcome(plan, rows)
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


def _prefactor(
    targets: list[tuple[str, nn.Module]], config: DecomposeConfig, plan: BudgetPlan | None
) -> dict[tuple[Any, ...], Any]:
    """Batched factorisations of the targets whose ranks are known (Tucker-2 and CP), when
    ``config.batch_kernels`` asks for them (``None``: when a targeted kernel is on a GPU)."""
    wanted = getattr(config, "batch_kernels", False)
    if wanted is False:
        return {}
    requests = []
    for name, module in targets:
        ranks = None
        if plan is not None:
            if name in plan.reasons or not plan.choices[name].ranks:
                continue
            ranks = tuple(plan.choices[name].ranks)
        request = batch_request(module, config, ranks)
        if request is not None and (wanted or request[2].device.type != "cpu"):
            requests.append(request)
    if isinstance(config, CPConfig):
        return prefactor.prefactor(requests, **cp_options(config))
    assert isinstance(config, TuckerConfig)
    return prefactor_tucker(requests, n_iter=config.n_iter, tol=config.tol)


def _factorise_all(
    targets: list[tuple[str, nn.Module]],
    config: DecomposeConfig,
    plan: BudgetPlan | None,
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]],
    batch: int,
    rows: list[LayerReport],
    replacements: dict[str, nn.Module],
    blocked: Mapping[str, str],
) -> None:
    """Factorise each target (a row per layer; the new modules into ``replacements``); the
    ``blocked`` ones are skipped with their reason."""
    for name, module in targets:
        before = count_params(module)
        row = LayerReport(
            name,
            type(module).__name__,
            "skipped",
            method=config.method,
            params_before=before,
            params_after=before,
            flops_before=layer_flops(module, shapes.get(name), batch),
        )
        row.flops_after = row.flops_before
        try:
            if name in blocked:
                raise SkipLayer(blocked[name])
            result = _factorise(name, module, config, plan)
            if config.min_speedup is not None and config.speed_scope == "layer":
                _check_speed(row, module, result, config, shapes.get(name))
        except SkipLayer as exc:
            row.reason = str(exc)
        except Exception as exc:  # a failed decomposition skips the layer, with the reason
            row.reason = f"decomposition failed: {type(exc).__name__}: {exc}"
        else:
            new = result.module.train(module.training)
            surgery.carry_frozen(module, new)
            replacements[name] = new
            row.action, row.ranks, row.rel_error = "decomposed", result.ranks, result.rel_error
            row.params_after = count_params(new)
            row.flops_after = layer_flops(new, shapes.get(name), batch)
            row.info = result.info
        logger.debug(  # the report's table has every row
            "decompose %s: %s%s",
            name,
            row.action,
            f" ({row.reason})" if row.reason else f" ranks {row.ranks}",
        )
        rows.append(row)


def _factorise(
    name: str, module: nn.Module, config: DecomposeConfig, plan: BudgetPlan | None
) -> Factorised:
    """The factorised layer, by the budget plan or the handler, :func:`checked` (or SkipLayer)."""
    if plan is not None:
        if name in plan.reasons:
            raise SkipLayer(plan.reasons[name])
        return checked(module, lambda: build_option(module, config, plan.choices[name]))
    handler = find_handler(config, module)
    return checked(module, lambda: handler(module, config, name))


def _check_speed(
    row: LayerReport,
    module: nn.Module,
    result: Factorised,
    config: DecomposeConfig,
    shapes: tuple[tuple[int, ...], tuple[int, ...]] | None,
) -> None:
    """Fill the row's latency fields; raise ``SkipLayer`` unless the speed-up is enough."""
    assert config.min_speedup is not None
    if shapes is None:
        raise SkipLayer(
            "speed not checked: the layer did not run on example_input, so its input shape is "
            "unknown; kept dense (exclude it or give an input that reaches it)"
        )
    batches: tuple[int | None, ...] = config.speed_batches() or (None,)
    worst = None
    for batch in batches:
        shape = shapes[0] if batch is None else (batch, *shapes[0][1:])
        check = layer_speedup(
            module,
            result.module,
            shape,
            speed_on=config.speed_on,
            channels_last=config.speed_channels_last,
        )
        if worst is None or check.speedup < worst[0].speedup:
            worst = (check, shape)
    assert worst is not None
    check, shape = worst
    row.latency_before_s, row.latency_after_s = check.original_s, check.factorised_s
    row.speedup, row.speed_source = check.speedup, check.source
    if check.speedup < config.min_speedup:
        row.info = {"tried_ranks": result.ranks, "tried_rel_error": result.rel_error}
        raise SkipLayer(
            f"not faster: {check.original_s * 1e6:.1f} us -> {check.factorised_s * 1e6:.1f} us "
            f"at input {tuple(shape)} ({check.speedup:.2f}x < min_speedup {config.min_speedup}, "
            f"{check.source}); kept dense"
        )


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
        try:
            new = cls.from_spec(dict(spec), device=device, dtype=dtype)  # type: ignore[attr-defined]
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(
                f"layer {name!r} has a malformed {kind} spec {dict(spec)!r} ({exc}); re-save the "
                "model"
            ) from None
        set_submodule(model, name, new.train(old.training))
    return model


def _replay_decomposed(model: nn.Module, params: dict[str, Any]) -> None:
    rebuild_decomposed(model, params)


ARCH_TRANSFORMS.add(TRANSFORM_NAME, _replay_decomposed)
