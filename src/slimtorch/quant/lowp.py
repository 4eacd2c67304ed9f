"""FP16/BF16 casts with an accuracy check, keep-in-fp32 rules and a device-profile verdict.

:func:`cast_` casts a model's layers to float16 or bfloat16 in place, except those a rule keeps
in float32 (by default the first and last conv/linear layer and the normalisation layers, the
usual sensitive ones), with boundary casts so the model still takes and returns float32
(:mod:`slimtorch.quant.precision`). Given check data it compares the cast model with the float32
one (relative output error, top-1 agreement, accuracy when labelled) and either refuses, leaving
the model untouched, or (``on_fail="fallback"``) keeps the layers that hurt most in float32 until
the check passes, recording why.

What the check data decides: the data fits when the float32 model runs it; a cast model that then
fails to run (a float16 tensor meeting a float32 one outside the boundary casts) or gives NaN/Inf
fails the check, with the reason, and ``on_fail="fallback"`` treats it like any other failure.
The "first"/"last" rules take the first and last conv/linear layer each check batch ran (every
branch the data reached), and units no check batch ran stay float32 with that reason (the check
cannot vouch for them); without check data they follow registration order. The model's output is
cast back to float32 whichever layer produced it (a recorded hook on the model), so it returns
float32 on every branch. Parameters the model owns itself (``F.conv2d(x, self.w)`` in its own
``forward``) stay float32, and then every cast layer returns float32 so that what meets them is
float32 (a note says so; it costs a cast kernel after each such layer).

Whether the cast is a speed win depends on the device: the report reads the profile's peak rates
(:mod:`slimtorch.core.profiles`). On the RX 580 fp16 computes at the fp32 rate (no packed fp16),
so a cast saves memory and bandwidth only; on tensor-core GPUs it also saves arithmetic time; a
GTX 1060's native fp16 arithmetic runs at 1/64 of its fp32 rate, but PyTorch's fp16 kernels
there multiply in the fp32 units, so its profile, too, gives fp16 the fp32 rate. Estimated
latencies before and after on the profile come from
:func:`slimtorch.core.measure.estimate_latency`, at the first check batch.

Example:
    >>> from slimtorch.models import create_model
    >>> model = create_model("lenet5", in_channels=1, input_size=28).eval()
    >>> x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    >>> report = cast_(model, LowPrecisionConfig(dtype="fp16"), check_inputs=(x, y),
    ...                device_profile="rx580")
    >>> report.gain, report.output_error < 0.01
    ('memory', True)
    >>> [r.dtype for r in report.rows]  # first and last layer kept in float32
    ['float32', 'float16', 'float16', 'float16', 'float32']
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import logging
from typing import Any

import torch
from torch import nn

from slimtorch.core.config import Config, check_choice, check_range
from slimtorch.core.errors import SlimtorchError
from slimtorch.core.measure import estimate_latency, model_size_bytes
from slimtorch.core.profiles import DeviceProfile, get_profile
from slimtorch.core.surgery import (
    refuse_sparse_kernels,
    require_float32,
    require_submodules,
    require_values,
)
from slimtorch.core.table import text_table
from slimtorch.quant import _calib
from slimtorch.quant.precision import (
    DTYPES,
    beyond_range,
    layer_precisions,
    precision_units,
    root_float_parameters,
    set_precision_,
)
from slimtorch.quant.qdq import QDQConv2d, QDQLinear

logger = logging.getLogger(__name__)

RULES = ("first", "last", "norm")
_NORM = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)
_COMPUTE = (nn.modules.conv._ConvNd, nn.Linear)


class PrecisionCheckError(SlimtorchError):
    """A low-precision model failed its accuracy/output-error check (the model is untouched)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LowPrecisionConfig(Config):
    """How to cast a model to half precision.

    Attributes:
        dtype: ``"fp16"`` or ``"bf16"``.
        keep_fp32: Rules and globs of layers kept in float32: ``"first"``/``"last"`` (the first
            and last conv/linear layer run), ``"norm"`` (normalisation layers), or dotted-name
            globs (``"layer3.*"``).
        max_output_error: Largest relative L2 error ``||y - y_fp32|| / ||y_fp32||`` accepted on
            the check data (``None``: not checked).
        max_accuracy_drop: Largest drop of top-1 accuracy (fraction: 0.005 = 0.5 points) on
            labelled check data (``None``: not checked).
        on_fail: ``"raise"`` (refuse, model untouched) or ``"fallback"`` (keep the most
            sensitive layers in float32 until the check passes).
    """

    dtype: str = "fp16"
    keep_fp32: tuple[str, ...] = ("first", "last", "norm")
    max_output_error: float | None = 0.01
    max_accuracy_drop: float | None = 0.005
    on_fail: str = "raise"

    def __post_init__(self) -> None:
        check_choice(self, "dtype", self.dtype, ("fp16", "bf16"))
        if isinstance(self.keep_fp32, str) or not isinstance(self.keep_fp32, tuple | list):
            raise ValueError(
                f"LowPrecisionConfig.keep_fp32 must be a tuple of rules {RULES} or globs, got "
                f"{self.keep_fp32!r}"
            )
        if not all(isinstance(k, str) and k for k in self.keep_fp32):
            raise ValueError(f"LowPrecisionConfig.keep_fp32 holds a non-string: {self.keep_fp32!r}")
        object.__setattr__(self, "keep_fp32", tuple(self.keep_fp32))
        if self.max_output_error is not None:
            check_range(
                self, "max_output_error", self.max_output_error, low=0.0, low_inclusive=False
            )
        if self.max_accuracy_drop is not None:
            check_range(self, "max_accuracy_drop", self.max_accuracy_drop, low=0.0, high=1.0)
        check_choice(self, "on_fail", self.on_fail, ("raise", "fallback"))


@dataclasses.dataclass
class PrecisionRow:
    """One layer (precision unit): its dtype after the cast and why."""

    name: str
    module_type: str
    dtype: str
    reason: str
    bytes_before: int = 0
    bytes_after: int = 0


@dataclasses.dataclass
class LowPrecisionReport:
    """What :func:`cast_` did, what it cost and what it should gain on the target profile."""

    config: dict[str, Any]
    rows: list[PrecisionRow]
    checked: bool = False
    output_error: float | None = None
    agreement: float | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    size_before: int = 0
    size_after: int = 0
    profile: str | None = None
    gain: str | None = None
    gain_reason: str | None = None
    est_latency_before_s: float | None = None
    est_latency_after_s: float | None = None
    fallback: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    entry: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        out = dataclasses.asdict(self)
        out["method"] = "lowp"
        out["layers"] = out.pop("rows")
        return out

    def to_table(self) -> str:
        """A header and one line per layer, then the totals."""
        table = [("layer", "type", "dtype", "reason")]
        table += [(r.name, r.module_type, r.dtype, r.reason) for r in self.rows]
        lines = [text_table(table), f"size {self.size_before:,} -> {self.size_after:,} bytes"]
        if self.checked:
            error = "not measured" if self.output_error is None else f"{self.output_error:.3g}"
            agree = "" if self.agreement is None else f", top-1 agreement {self.agreement:.2%}"
            lines.append(f"output error {error}{agree}")
        if self.profile:
            lines.append(f"{self.profile}: {self.gain} ({self.gain_reason})")
        return "\n".join(lines)


def precision_gain(profile: DeviceProfile | str, dtype: str) -> tuple[str, str]:
    """``("speed" | "memory" | "slower", why)``: what ``dtype`` buys over fp32 on ``profile``.

    Example:
        >>> precision_gain("rx580", "fp16")[0], precision_gain("h100-sxm", "bf16")[0]
        ('memory', 'speed')
    """
    if dtype not in ("fp16", "bf16"):
        raise ValueError(f"precision_gain compares 'fp16' or 'bf16' with fp32, got {dtype!r}")
    prof = get_profile(profile)
    ratio = prof.peak_rate(dtype) / prof.peak_rate("fp32")
    if ratio > 1.05:
        return "speed", (
            f"{dtype} computes at {ratio:.3g}x the fp32 rate on {prof.name} and halves the bytes "
            "moved"
        )
    if ratio >= 0.95:
        return "memory", (
            f"{dtype} computes at the fp32 rate on {prof.name} (no faster {dtype} path): it "
            "halves memory and bandwidth, not arithmetic time"
        )
    return "slower", (
        f"{dtype} arithmetic runs at {ratio:.3g}x the fp32 rate on {prof.name}: compute-bound "
        "layers get slower; the cast only saves memory"
    )


def _rules(
    units: dict[str, nn.Module], runs: list[list[str]], keep: tuple[str, ...]
) -> dict[str, str]:
    """Unit name -> reason it stays float32; ``runs``: the units each batch ran, in order."""
    computes = [[n for n in run if isinstance(units[n], _COMPUTE)] for run in runs]
    kept: dict[str, str] = {}
    for rule in keep:
        if rule in ("first", "last"):
            for compute in computes:
                if compute:
                    n = compute[0 if rule == "first" else -1]
                    kept.setdefault(n, f"{rule} conv/linear layer (rule {rule!r})")
        elif rule == "norm":
            for n in units:
                if isinstance(units[n], _NORM):
                    kept.setdefault(n, "normalisation layer (rule 'norm')")
        elif rule not in RULES:
            hits = [n for n in units if fnmatch.fnmatchcase(n, rule)]
            if not hits:
                raise ValueError(
                    f"keep_fp32 glob {rule!r} matches no layer; layer names look like "
                    f"{', '.join(list(units)[:6])}, ..."
                )
            for n in hits:
                kept.setdefault(n, f"matches keep_fp32 glob {rule!r}")
    return kept


def _apply(
    model: nn.Module, low: list[str], dtype: torch.dtype, every_output: bool, record: bool = True
) -> dict[str, Any]:
    """The boundary casts of :func:`cast_`: the model's output back to float32, and every cast
    unit's too when ``every_output`` (the model uses parameters of its own in its forward)."""
    out_fp32 = list(low) if every_output else []
    return set_precision_(
        model, low, dtype, output_fp32=out_fp32, model_output_fp32=True, record=record
    )


Trial = tuple[list[torch.Tensor] | None, str | None]


def _trial(
    model: nn.Module, low: list[str], dtype: torch.dtype, every_output: bool, batches: list[Any]
) -> Trial:
    """Outputs of a cast copy on the check data, or ``None`` and why it failed."""
    work = copy.deepcopy(model)
    _apply(work, low, dtype, every_output, record=False)
    name = str(dtype).removeprefix("torch.")
    try:
        return _calib.run_batches(work, batches, "check data", trial=True), None
    except _calib.CalibrationError:
        why = " (values beyond float16's range of +-65504)" if dtype == torch.float16 else ""
        return None, f"the {name} model gives NaN/Inf outputs on the check data{why}"
    except _calib.TrialError as exc:
        return None, (
            f"the cast breaks the model, which runs in float32 on the same data: {exc}; a {name} "
            "tensor meets a float32 one outside the layers' boundary casts (a parameter or "
            "buffer used functionally, or weights shared between layers)"
        )


def _passes(
    cfg: LowPrecisionConfig, trial: Trial, refs: list[torch.Tensor], batches: list[Any]
) -> tuple[bool, dict[str, Any]]:
    outs, failure = trial
    if outs is None or len(outs) != len(refs):
        bad = {"output_error": float("inf"), "agreement": 0.0, "accuracy": None}
        return False, {**bad, "failure": failure or "the cast model returned fewer outputs"}
    m: dict[str, Any] = {
        "output_error": _calib.rel_error(outs, refs),
        "agreement": _calib.agreement(outs, refs),
        "accuracy": _calib.accuracy(outs, batches),
    }
    ok = cfg.max_output_error is None or m["output_error"] <= cfg.max_output_error
    acc_ref = _calib.accuracy(refs, batches)
    if cfg.max_accuracy_drop is not None and acc_ref is not None and m["accuracy"] is not None:
        ok = ok and acc_ref - m["accuracy"] <= cfg.max_accuracy_drop + 1e-12
    return ok, m


def cast_(
    model: nn.Module,
    config: LowPrecisionConfig,
    *,
    check_inputs: Any = None,
    device_profile: DeviceProfile | str | None = None,
) -> LowPrecisionReport:
    """Cast ``model`` to fp16/bf16 in place, keeping sensitive layers in fp32, after a check.

    Args:
        model: A float32 model, changed in place (nothing changes when the check fails).
        config: The :class:`LowPrecisionConfig`.
        check_inputs: A tensor, an ``(inputs, labels)`` pair or an iterable of either: compared
            against the float32 model; the layers it runs decide the "first"/"last" rules, and
            its first batch drives the latency estimate. ``None`` casts unchecked (a warning
            says so).
        device_profile: A profile (name) to judge the gain on and estimate latency on.

    Returns:
        A :class:`LowPrecisionReport`.

    Raises:
        TypeError, ValueError: Bad arguments or check data (empty, NaN, or the float32 model
            rejects it).
        PrecisionCheckError: The check failed (``on_fail="raise"``, or nothing left to keep):
            too large an error, NaN/Inf outputs, or a cast model that no longer runs.

    Example:
        >>> from slimtorch.models import create_model
        >>> net = create_model("resnet20", in_channels=1, input_size=28).eval()
        >>> cast_(net, LowPrecisionConfig(dtype="bf16", max_output_error=0.05),
        ...       check_inputs=torch.randn(16, 1, 28, 28)).rows[0].dtype
        'float32'
    """
    require_values(model, "cast_")
    refuse_sparse_kernels(model, "cast_")
    require_submodules(model, "cast_")
    if not isinstance(config, LowPrecisionConfig):
        raise TypeError(f"config must be a LowPrecisionConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if layer_precisions(model):
        raise ValueError("the model is already cast; cast_ takes a float32 model")
    require_float32(
        model, "cast_", "model.float() first: the cast keeps sensitive layers in float32"
    )
    int8 = [n for n, m in model.named_modules() if isinstance(m, QDQConv2d | QDQLinear)]
    if int8:
        raise ValueError(
            f"int8 Q/DQ layer(s) {', '.join(int8[:6])}{', ...' if len(int8) > 6 else ''} cannot "
            "be cast to fp16/bf16 (their inputs would no longer match); cast_ takes a float32 "
            "model: cast the float model, or keep the int8 one"
        )
    dtype = DTYPES[config.dtype]
    units = precision_units(model)
    own = root_float_parameters(model)
    batches = None if check_inputs is None else _calib.as_batches(check_inputs, "check_inputs")
    report = LowPrecisionReport(config={"type": "LowPrecisionConfig", **config.to_dict()}, rows=[])
    refs, example, unreached = None, None, []
    if batches is not None:
        with _calib.track_calls(model, units) as runs:
            refs = _calib.run_batches(model, batches, "check_inputs")
        example = batches[0][0].to(_calib.model_device(model))
        order = list(dict.fromkeys(n for run in runs for n in run))
        unreached = [n for n in units if n not in order]
        order += unreached
    else:
        order, runs = list(units), [list(units)]
        logger.warning("cast_ without check_inputs: the %s cast is not checked", config.dtype)
    kept = _rules(units, runs, config.keep_fp32)
    for n, unit in units.items():  # with or without check data: Inf is never a cast's result
        if n not in kept and (why := beyond_range(unit, dtype)):
            kept[n] = f"{why}: kept float32"
    for n in unreached:
        kept.setdefault(
            n, "never ran on the check data: kept float32, as the check cannot vouch for it "
            "(give check data that reaches it to cast it)",
        )  # fmt: skip
    low = [n for n in order if n not in kept]
    if batches is not None and refs is not None:
        report.checked = True
        report.accuracy_before = _calib.accuracy(refs, batches)
        ok, m = _passes(config, _trial(model, low, dtype, bool(own), batches), refs, batches)
        if not ok and config.on_fail == "fallback":
            if m.get("failure"):
                report.notes.append(f"the full cast failed its check: {m['failure']}")
            ok, m = _fallback(model, low, kept, dtype, bool(own), config, batches, refs, report)
        if not ok:
            detail = m.get("failure") or (
                f"output error {m['output_error']:.4g} vs max {config.max_output_error}, "
                f"accuracy {m['accuracy']} vs {report.accuracy_before} with max drop "
                f"{config.max_accuracy_drop}"
            )
            raise PrecisionCheckError(
                f"the {config.dtype} model fails its check ({detail}); the model is unchanged. "
                "Keep more layers in fp32 (keep_fp32), use on_fail='fallback', try the other "
                "dtype, or relax the limits"
            )
        report.output_error, report.agreement = m["output_error"], m["agreement"]
        report.accuracy_after = m["accuracy"]
    if own and low:
        report.notes.append(
            f"the model uses parameter(s) {', '.join(own[:6])} of its own in its forward: they "
            f"stay float32, so every {config.dtype} layer casts its output back to float32 "
            "(a cast kernel after each)"
        )
    prof = None if device_profile is None else get_profile(device_profile)
    report.size_before = model_size_bytes(model)
    if prof is not None:
        report.profile = prof.name
        report.gain, report.gain_reason = precision_gain(prof, config.dtype)
        if example is not None:
            report.est_latency_before_s = estimate_latency(model, example, prof).total_s
        else:
            report.notes.append("no check_inputs: latency on the profile not estimated")
    sizes = {n: model_size_bytes(units[n]) for n in units}
    report.entry = _apply(model, low, dtype, bool(own))
    report.size_after = model_size_bytes(model)
    if prof is not None and example is not None:
        report.est_latency_after_s = estimate_latency(model, example, prof).total_s
        if report.est_latency_before_s is not None and (
            report.est_latency_after_s > report.est_latency_before_s
        ):
            report.notes.append(
                f"estimated slower on {prof.name} ({report.est_latency_before_s * 1e3:.3g} -> "
                f"{report.est_latency_after_s * 1e3:.3g} ms at batch {len(example)}, the "
                f"model as cast_ got it): each fp32/{config.dtype} boundary "
                "adds a cast kernel; fold batch norms first (slimtorch.quant.fold.fold_bn_) or "
                "keep fewer layers in fp32"
            )
    for n in order:
        dt = "float32" if n in kept else str(dtype).removeprefix("torch.")
        report.rows.append(
            PrecisionRow(
                n,
                type(units[n]).__name__,
                dt,
                kept.get(n, f"cast to {config.dtype}"),
                sizes[n],
                model_size_bytes(units[n]),
            )
        )
    logger.info("cast_: %d layer(s) to %s, %d kept fp32", len(low), config.dtype, len(kept))
    return report


def _fallback(
    model: nn.Module,
    low: list[str],
    kept: dict[str, str],
    dtype: torch.dtype,
    every_output: bool,
    config: LowPrecisionConfig,
    batches: list[Any],
    refs: list[torch.Tensor],
    report: LowPrecisionReport,
) -> tuple[bool, dict[str, Any]]:
    """Keep the layers with the largest error when cast alone in fp32 until the check passes
    (first those the model fails with, NaN/Inf or an error, when cast alone).

    Changes ``low`` and ``kept`` in place; returns the final check result.
    """
    alone: dict[str, float] = {}
    why: dict[str, str | None] = {}
    for n in low:
        outs, why[n] = _trial(model, [n], dtype, every_output, batches)
        alone[n] = float("inf") if outs is None else _calib.rel_error(outs, refs)
    ok, m = False, {"output_error": float("inf"), "agreement": None, "accuracy": None}
    for n in sorted(alone, key=lambda k: -alone[k]):
        low.remove(n)
        failure = why[n]
        kept[n] = (
            f"fallback: the check fails with it cast alone ({failure})"
            if failure
            else f"fallback: output error {alone[n]:.3g} when cast alone"
        )
        report.fallback.append(n)
        if not low:
            break
        ok, m = _passes(config, _trial(model, low, dtype, every_output, batches), refs, batches)
        if ok:
            break
    return ok, m
