"""Mixed precision ("adaptive quantization"): a per-layer choice of fp16, int8 or int4 weights.

:func:`mixed_precision_` measures how much each Conv2d/Linear layer hurts the model at each
candidate precision when changed alone (:func:`~slimtorch.quant.mixed_sensitivity.
measure_sensitivity`), then picks one precision per layer that meets a size or latency budget with
the least predicted loss, and realises it: int8/int4 layers become weight-only Q/DQ layers
(:func:`slimtorch.quant.to_qdq_`, per-channel scales chosen by squared error), fp16 layers are
cast with boundary casts (:mod:`slimtorch.quant.precision`).

Allocation: predicted loss is the sum of the per-layer losses (the usual additivity assumption of
sensitivity-based mixed precision; exact for independent rounding noises under the output-error
metric). Choosing one option per layer under a budget is a multiple-choice knapsack
(:func:`~slimtorch.quant.knapsack.allocate`): solved exactly over whole bytes for a size budget,
and over ``dp_bins`` steps of the budget for a latency one (costs rounded up, so the result
always fits the real budget).

Sizes are deployed bytes: int4 weights packed two per byte (see
:func:`~slimtorch.quant.mixed_sensitivity.layer_bytes`). The report also gives the bytes the
model holds in memory now (``stored_bytes_after``), where 4-bit values sit in int8 tensors, and
the size of the ``model.safetensors`` file ``save_model`` writes (``saved_bytes_after``: 4-bit
weights packed two per byte, plus the file's header of tensor names and shapes, which the budget
does not count: a few kilobytes for resnet20).

Like :func:`slimtorch.quant.quantize_`, it refuses calibration data that never reaches a targeted
layer (its loss could not be measured). fp16 is offered only to layers that are precision units
of their own (:func:`~slimtorch.quant.precision.precision_units`): a layer inside a module that
owns parameters itself (a layer-scale block) is cast with that module or not at all, so it
chooses among the integer options (or stays fp32), and its row says why. A candidate that makes
the outputs NaN/Inf (fp16 beyond its range of +-65504) gets an infinite loss and is never chosen.
The model's output is cast back to float32, and when the model uses parameters of its own in its
``forward`` every fp16 layer's output is too (:mod:`slimtorch.quant.lowp` does the same).

Example:
    >>> from slimtorch.models import create_model
    >>> model = create_model("lenet5", in_channels=1, input_size=28).eval()
    >>> x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    >>> report = mixed_precision_(model, MixedPrecisionConfig(size_ratio=5.0), (x, y))
    >>> report.size_fp32 / report.size_after >= 5.0
    True
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import logging
import math
from typing import Any

import torch
from torch import nn

from slimtorch.core.config import Config, check_bool, check_choice, check_range
from slimtorch.core.measure import estimate_latency, model_size_bytes, storage_bytes
from slimtorch.core.measure.params import weight_buffer_layers
from slimtorch.core.profiles import list_profiles
from slimtorch.core.surgery import (
    refuse_sparse_kernels,
    replacement_blockers,
    require_float32,
    require_submodules,
    require_values,
)
from slimtorch.core.table import text_table
from slimtorch.models.io import saved_bytes
from slimtorch.quant import _calib
from slimtorch.quant.fold import fold_bn_
from slimtorch.quant.knapsack import allocate
from slimtorch.quant.lowp import PrecisionCheckError
from slimtorch.quant.mixed_sensitivity import (
    BITS,
    CANDIDATES,
    choice_reason,
    latency_costs,
    layer_bytes,
    measure_sensitivity,
    weight_scales,
)
from slimtorch.quant.precision import (
    beyond_range,
    precision_units,
    root_float_parameters,
    set_precision_,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MixedPrecisionConfig(Config):
    """Budget and candidates of a mixed-precision allocation (give exactly one budget).

    Attributes:
        budget_bytes: Deployed model size limit in bytes: the tensors' bytes, without the
            saved file's header (``saved_bytes_after`` in the report counts it).
        size_ratio: Model at most ``fp32 size / size_ratio`` (5.0: five times smaller).
        latency_s: Estimated latency limit (roofline on ``profile``, first calibration batch).
        profile: Device profile of the latency budget and estimates.
        candidates: Precisions to choose from, among ``fp32``, ``fp16``, ``int8``, ``int4``.
        metric: ``"output_error"`` or ``"accuracy"`` (labelled calibration data).
        first_last: Lowest precision allowed for the first and last conv/linear layer
            (``None``: no rule).
        include: Globs of Conv2d/Linear layers to allocate (``None``: all).
        exclude: Globs of layers to leave in float32.
        fold_bn: Fold Conv2d+BatchNorm2d pairs first (exact; removes the batch norms' bytes).
        scale_method: Weight scales, ``"mse"`` or ``"minmax"``.
        dp_bins: Budget resolution of the knapsack for a latency budget (>= 100); a size
            budget is solved over whole bytes.
        max_batches: Calibration batches used at most.
    """

    budget_bytes: int | None = None
    size_ratio: float | None = None
    latency_s: float | None = None
    profile: str = "rx580"
    candidates: tuple[str, ...] = ("fp16", "int8", "int4")
    metric: str = "output_error"
    first_last: str | None = "int8"
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    fold_bn: bool = True
    scale_method: str = "mse"
    dp_bins: int = 2000
    max_batches: int | None = 8

    def __post_init__(self) -> None:
        given = [
            k for k in ("budget_bytes", "size_ratio", "latency_s") if getattr(self, k) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "MixedPrecisionConfig needs exactly one budget among budget_bytes, size_ratio "
                f"and latency_s, got {given or 'none'} (slimtorch compress --method mixed: "
                "e.g. --set size_ratio=4 for a quarter of the float32 size)"
            )
        for name in ("dp_bins", "max_batches"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"MixedPrecisionConfig.{name} must be an int, got {value!r}")
        check_bool(self, "fold_bn", self.fold_bn)
        if self.budget_bytes is not None:
            check_range(self, "budget_bytes", self.budget_bytes, low=1)
        if self.size_ratio is not None:
            check_range(self, "size_ratio", self.size_ratio, low=1.0)
        if self.latency_s is not None:
            check_range(self, "latency_s", self.latency_s, low=0.0, low_inclusive=False)
        cands = tuple(self.candidates)
        if not cands or any(c not in CANDIDATES for c in cands) or len(set(cands)) != len(cands):
            raise ValueError(
                f"MixedPrecisionConfig.candidates must be distinct values of {CANDIDATES}, got "
                f"{self.candidates!r}"
            )
        object.__setattr__(self, "candidates", cands)
        check_choice(self, "profile", self.profile, tuple(list_profiles()))
        check_choice(self, "metric", self.metric, ("output_error", "accuracy"))
        check_choice(self, "first_last", self.first_last, (*CANDIDATES, None))
        for field in ("include", "exclude"):
            value = getattr(self, field)
            if value is None and field == "include":
                continue
            if isinstance(value, str) or not all(isinstance(p, str) for p in value):
                raise ValueError(f"MixedPrecisionConfig.{field} must be a tuple of globs")
            object.__setattr__(self, field, tuple(value))
        check_choice(self, "scale_method", self.scale_method, ("mse", "minmax"))
        check_range(self, "dp_bins", self.dp_bins, low=100, high=100_000)
        if self.max_batches is not None:
            check_range(self, "max_batches", self.max_batches, low=1)


@dataclasses.dataclass
class MixedRow:
    """One layer's choice, its cost and why."""

    name: str
    module_type: str
    choice: str
    reason: str
    bytes_fp32: int
    bytes_after: int
    losses: dict[str, float]
    est_latency_s: dict[str, float] | None = None


@dataclasses.dataclass
class MixedPrecisionReport:
    """The allocation, predicted and measured loss, sizes and latency estimates."""

    config: dict[str, Any]
    rows: list[MixedRow]
    budget: dict[str, Any]
    allocation: str = "multiple-choice knapsack, dynamic programming"
    predicted_loss: float = 0.0
    output_error: float | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    size_fp32: int = 0
    size_after: int = 0
    stored_bytes_after: int = 0
    saved_bytes_after: int = 0
    est_latency_before_s: float | None = None
    est_latency_after_s: float | None = None
    fold: dict[str, Any] | None = None
    entries: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        out = dataclasses.asdict(self)
        out["method"] = "mixed"
        out["layers"] = out.pop("rows")
        out["ratio"] = self.size_fp32 / self.size_after if self.size_after else None
        return out

    def to_table(self) -> str:
        """A header, one line per layer (name, precision, bytes, why), then the totals."""
        rows = [("layer", "dtype", "bytes", "reason")]
        rows += [(r.name, r.choice, f"{r.bytes_fp32:,} -> {r.bytes_after:,}", r.reason)
                 for r in self.rows]  # fmt: skip
        lines = [text_table(rows)]
        ratio = self.size_fp32 / max(self.size_after, 1)
        lines.append(f"size {self.size_fp32:,} -> {self.size_after:,} bytes ({ratio:.2f}x)")
        error = "not measured" if self.output_error is None else f"{self.output_error:.3g}"
        lines.append(f"predicted loss {self.predicted_loss:.3g}, output error {error}")
        return "\n".join(lines)


def _targets(model: nn.Module, cfg: MixedPrecisionConfig) -> list[str]:
    out = []
    for name, m in model.named_modules():
        if type(m) not in (nn.Conv2d, nn.Linear) or not name:
            continue
        if cfg.include is not None and not any(fnmatch.fnmatchcase(name, p) for p in cfg.include):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in cfg.exclude):
            continue
        out.append(name)
    if not out:
        stored = weight_buffer_layers(model)
        if stored:  # an int8 model: its layers are no Conv2d/Linear any more
            name, (module, _, dtype, _) = next(iter(stored.items()))
            raise ValueError(
                f"{len(stored)} layer(s) of {type(model).__name__} ({name}, ...) hold "
                f"{dtype} weights already ({type(module).__name__}); run mixed precision on "
                "the float model"
            )
        raise ValueError(
            f"no Conv2d/Linear layer of {type(model).__name__} matches include={cfg.include!r}, "
            f"exclude={cfg.exclude!r}"
        )
    return out


def _weights_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers but a pruned model's bool masks (training aids)."""
    return model_size_bytes(model) - storage_bytes(model).get("bool", 0)


def mixed_precision_(
    model: nn.Module, config: MixedPrecisionConfig, calibration: Any
) -> MixedPrecisionReport:
    """Choose and apply one precision per Conv2d/Linear layer within a budget, in place.

    Args:
        model: A float32 model, changed in place (untouched when anything fails).
        config: The :class:`MixedPrecisionConfig`.
        calibration: A tensor, an ``(inputs, labels)`` pair or an iterable of either; it
            drives the sensitivities, the latency estimate and the final check.

    Returns:
        A :class:`MixedPrecisionReport`: each layer's choice and why, predicted loss, measured
        output error (and accuracy with labels), sizes and latency estimates.

    Raises:
        TypeError, ValueError: Bad arguments or calibration data, or a budget that no
            allocation meets (the message gives the smallest reachable size or latency).
        CalibrationError: The float model gives NaN/Inf outputs on the calibration data, or
            the data never reaches a targeted layer.
        PrecisionCheckError: The chosen model fails to run or gives NaN/Inf on the data.

    Example:
        >>> from slimtorch.models import create_model
        >>> model = create_model("lenet5", in_channels=1, input_size=28).eval()
        >>> x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
        >>> report = mixed_precision_(model, MixedPrecisionConfig(size_ratio=5.0), (x, y))
        >>> [r.name for r in report.rows]
        ['features.0', 'features.3', 'fc1', 'fc2', 'classifier']
        >>> report.rows[2].choice, type(model.fc1).__name__  # 5x smaller needs fc1 in int4
        ('int4', 'QDQLinear')
        >>> {r.choice for r in report.rows} <= {"fp16", "int8", "int4"}
        True
    """
    require_values(model, "mixed_precision_")
    refuse_sparse_kernels(model, "mixed_precision_")
    require_submodules(model, "mixed_precision_")
    require_float32(model, "mixed_precision_", "allocate precisions on the float32 model")
    from slimtorch.quant.convert import to_qdq_
    from slimtorch.quant.qdq import LayerQParams

    if not isinstance(config, MixedPrecisionConfig):
        raise TypeError(f"config must be a MixedPrecisionConfig, got {type(config).__name__}")
    batches = _calib.as_batches(calibration, "calibration", config.max_batches)
    size_fp32 = _weights_bytes(model)
    work = copy.deepcopy(model)
    fold = fold_bn_(work) if config.fold_bn else None
    names = _targets(work, config)
    blocked = replacement_blockers(work, [(n, work.get_submodule(n)) for n in names])
    names = [n for n in names if n not in blocked]  # a fused kernel reads their weights: kept
    example = batches[0][0].to(_calib.model_device(work))
    # every Conv2d/Linear of the model, so that first/last are the model's, not the targets'
    layers = {n: m for n, m in work.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    with _calib.track_calls(work, {**layers, **{n: work.get_submodule(n) for n in names}}) as runs:
        refs = _calib.run_batches(work, batches, "calibration")
    missing = [n for n in names if not any(n in run for run in runs)]
    if missing:
        raise _calib.CalibrationError(
            f"layer(s) {', '.join(missing)} never ran on the calibration data, so their loss at "
            "each precision cannot be measured; exclude them (MixedPrecisionConfig(exclude=...)) "
            "or give inputs that reach them. The model is unchanged"
        )
    ends = {run[i] for run in runs if run for i in (0, -1)} if config.first_last else set()
    floor = ends & set(names)  # the model's first/last layers, where they are allocated
    units = precision_units(work)
    allowed: dict[str, tuple[str, ...]] = {}
    notes = dict.fromkeys(names, "")
    for n in names:
        opts = config.candidates
        if n in floor:
            assert config.first_last is not None
            opts = tuple(c for c in CANDIDATES if BITS[c] >= BITS[config.first_last])
            opts = tuple(c for c in opts if c in config.candidates) or (config.first_last,)
        if n not in units and "fp16" in opts:
            owner = next((u for u in units if n.startswith(u + ".")), "its parent")
            opts = tuple(c for c in opts if c != "fp16") or ("fp32",)
            notes[n] = (
                f"; fp16 not offered: {n} sits in {owner}, which owns parameters of its own and "
                "is cast only as a whole"
            )
        elif "fp16" in opts and (why := beyond_range(units[n], torch.float16)):
            opts = tuple(c for c in opts if c != "fp16") or ("fp32",)
            notes[n] = f"; fp16 not offered: {why}"
        allowed[n] = opts
    all_cands = tuple(dict.fromkeys(c for n in names for c in allowed[n]))
    modules = {n: work.get_submodule(n) for n in names}
    sizes = {n: {c: float(layer_bytes(modules[n], c)) for c in allowed[n]} for n in names}
    rest_bytes = _weights_bytes(work) - sum(int(layer_bytes(modules[n], "fp32")) for n in names)
    lat, rest_s, rest_low, total_s = latency_costs(work, names, example, config.profile, all_cands)
    if config.latency_s is not None:
        kind, limit = "latency_s", float(config.latency_s)
        costs = {n: {c: lat[n][c] for c in allowed[n]} for n in names}
        cheapest = sum(min(costs[n].values()) for n in names)
        # the rest as it is in fp32, or (where only fp16 activations make it fit) the least it
        # can be; the estimate of the converted model below decides either way
        rest = rest_s if rest_s + cheapest <= limit else rest_low
    else:
        kind = "bytes"
        ratio_limit = size_fp32 / config.size_ratio if config.size_ratio else 0.0
        limit = float(config.budget_bytes) if config.budget_bytes is not None else ratio_limit
        costs, rest = sizes, float(rest_bytes)
    least = rest + sum(min(costs[n].values()) for n in names)
    if least > limit:
        raise ValueError(
            f"no allocation meets the budget of {limit:.6g} {kind}: the least reachable is "
            f"{least:.6g} ({rest:.6g} outside the allocated layers, cheapest allowed options "
            f"{', '.join(sorted(set(config.candidates)))}, first/last at least "
            f"{config.first_last}); relax the budget, allow int4 or drop the first/last rule. "
            "The model is unchanged"
        )
    scale_cache: dict[tuple[str, int], torch.Tensor] = {}
    losses = measure_sensitivity(
        work,
        names,
        batches,
        candidates=all_cands,
        metric=config.metric,
        scale_method=config.scale_method,
        scales=scale_cache,
    )
    hopeless = [n for n in names if all(math.isinf(losses[n][c]) for c in allowed[n])]
    if hopeless:
        raise PrecisionCheckError(
            f"layer(s) {', '.join(hopeless)} make the outputs NaN/Inf at every precision allowed "
            f"to them ({', '.join(sorted({c for n in hopeless for c in allowed[n]}))}; fp16 "
            "overflows beyond +-65504); allow int8, or exclude them to keep them float32. The "
            "model is unchanged"
        )
    choice = allocate({n: losses[n] for n in names}, costs, limit - rest, config.dp_bins)
    qparams = {}
    for n, c in choice.items():
        if c in ("int8", "int4"):
            w = modules[n].weight
            assert isinstance(w, torch.Tensor)
            if (n, BITS[c]) not in scale_cache:
                scale_cache[n, BITS[c]] = weight_scales(w, BITS[c], config.scale_method)
            scale = scale_cache[n, BITS[c]].cpu()
            qparams[n] = LayerQParams(weight_scale=scale, weight_bits=BITS[c])
    report = MixedPrecisionReport(
        config={"type": "MixedPrecisionConfig", **config.to_dict()},
        rows=[],
        budget={"kind": kind, "limit": limit, "outside_allocated": rest},
        size_fp32=size_fp32,
        est_latency_before_s=total_s,
        fold=None if fold is None else fold.to_dict(),
        accuracy_before=_calib.accuracy(refs, batches),
    )
    if qparams:
        report.entries.extend(to_qdq_(work, qparams, method="mixed").entries)
    fp16 = [n for n, c in choice.items() if c == "fp16"]
    if fp16:  # the model's output back to float32; every fp16 output if it has own parameters
        out_fp32 = fp16 if root_float_parameters(work) else []
        report.entries.append(
            set_precision_(work, fp16, torch.float16, output_fp32=out_fp32, model_output_fp32=True)
        )
    try:
        outs = _calib.run_batches(work, batches, "calibration", trial=True)
    except (_calib.TrialError, _calib.CalibrationError) as exc:
        raise PrecisionCheckError(
            f"the mixed-precision model ({', '.join(f'{n}: {c}' for n, c in choice.items())}) "
            f"fails on calibration data the float model runs ({exc}); the model is unchanged. "
            "Exclude the layers involved (exclude=...) or leave fp16 out of the candidates"
        ) from None
    report.output_error = _calib.rel_error(outs, refs)
    report.accuracy_after = _calib.accuracy(outs, batches)
    report.predicted_loss = sum(losses[n][c] for n, c in choice.items())
    report.size_after = round(rest_bytes + sum(sizes[n][c] for n, c in choice.items()))
    report.stored_bytes_after = model_size_bytes(work)
    report.saved_bytes_after = saved_bytes(work)  # the file save_model writes, header included
    report.est_latency_after_s = estimate_latency(work, example, config.profile).total_s
    if kind == "latency_s" and report.est_latency_after_s > limit:  # the model is as it was
        raise ValueError(
            f"the allocation is estimated at {report.est_latency_after_s * 1e6:.1f} us on "
            f"{config.profile}, over the latency budget of {limit * 1e6:.1f} us once the casts "
            "between its float16 and float32 layers are counted; raise latency_s, or use a "
            "size budget"
        )
    for n in names:
        c = choice[n]
        report.rows.append(
            MixedRow(
                name=n,
                module_type=type(modules[n]).__name__,
                choice=c,
                reason=choice_reason(
                    c,
                    losses[n],
                    costs[n],
                    config.first_last if n in floor else None,
                    notes[n],
                    unit="s" if config.latency_s is not None else "bytes",
                ),
                bytes_fp32=int(layer_bytes(modules[n], "fp32")),
                bytes_after=int(sizes[n][c]),
                losses=dict(losses[n]),
                est_latency_s=dict(lat[n]),
            )
        )
    model.__dict__.update(work.__dict__)  # commit: the model now is the converted copy
    logger.info("mixed_precision_: %s", {c: list(choice.values()).count(c) for c in all_cands})
    return report
