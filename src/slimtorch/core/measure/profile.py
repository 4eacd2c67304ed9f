"""One model's full measurement: size, FLOPs, measured latency and memory here, and roofline
estimates on device profiles, with a plain-text before/after comparison for transform reports.

Example:
    >>> x = torch.randn(8, 256)
    >>> wide = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10))
    >>> narrow = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))  # compressed
    >>> kw = dict(device="cpu", profiles=["rx580"], warmup=1, repeats=3, min_time_s=0)
    >>> before, after = profile_model(wide, x, **kw), profile_model(narrow, x, **kw)
    >>> table = compare_profiles(before, after).splitlines()
    >>> [line.split()[0] for line in table]
    ['metric', 'params', 'size', 'GFLOPs', 'latency', 'peak', 'est.']
    >>> table[1]
    'params (M)                       0.1367       0.0684    0.50x'
    >>> table[-1]
    'est. rx580 (ms)                  0.0324       0.0312    0.96x'
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from slimtorch.core.devices import cpu_threads, resolve_device
from slimtorch.core.measure.flops import flop_report_from_trace
from slimtorch.core.measure.latency import LatencyResult, measure_latency
from slimtorch.core.measure.memory import MemoryResult, measure_peak_memory
from slimtorch.core.measure.params import count_params, storage_bytes
from slimtorch.core.measure.roofline import RooflineEstimate, roofline_from_trace
from slimtorch.core.measure.trace import call_with, trace_ops
from slimtorch.core.profiles import DeviceProfile, get_profile, list_profiles

logger = logging.getLogger(__name__)

_MB = 1e6


@dataclasses.dataclass(frozen=True)
class ModelProfile:
    """Everything measured about one model on one input.

    Attributes:
        model: Class name of the model.
        input_shapes: Shapes of the tensor inputs.
        device: Where latency and memory were measured.
        params: Parameter count (shared parameters once).
        trainable_params: Parameters with ``requires_grad``.
        size_bytes: Bytes of parameters and buffers.
        storage: Those bytes by dtype name.
        flops: Matmul-like FLOPs of one forward pass (2 per MAC).
        macs: ``flops // 2``.
        latency: Measured latency of one forward pass here.
        memory: Peak memory of one forward pass here, above the model itself.
        estimates: Roofline estimate per profile name.
    """

    model: str
    input_shapes: tuple[tuple[int, ...], ...]
    device: str
    params: int
    trainable_params: int
    size_bytes: int
    storage: dict[str, int]
    flops: int
    macs: int
    latency: LatencyResult
    memory: MemoryResult
    estimates: dict[str, RooflineEstimate]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (estimates without their per-layer rows)."""
        return {
            "model": self.model,
            "input_shapes": [list(s) for s in self.input_shapes],
            "device": self.device,
            "params": self.params,
            "trainable_params": self.trainable_params,
            "size_bytes": self.size_bytes,
            "storage": dict(self.storage),
            "flops": self.flops,
            "macs": self.macs,
            "latency": self.latency.to_dict(),
            "memory": self.memory.to_dict(),
            "estimates": {
                name: {k: v for k, v in est.to_dict().items() if k != "rows"}
                for name, est in self.estimates.items()
            },
        }

    def to_table(self) -> str:
        """A plain text summary: header lines, then one row per profile estimate.

        Example:
            >>> net = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10))
            >>> p = profile_model(net, torch.randn(8, 256), device="cpu", profiles=["rx580"],
            ...     warmup=1, repeats=3, min_time_s=0)
            >>> table = p.to_table().splitlines()
            >>> table[:4]  # doctest: +NORMALIZE_WHITESPACE
            ['model        : Sequential (input 8x256)',
             'params       : 136,714 (136,714 trainable)',
             'size         : 0.547 MB (float32 0.547 MB)',
             'GFLOPs       : 0.0022 (0.0011 GMACs)']
            >>> table[4].startswith("latency here : ") and "n=3, cpu" in table[4]
            True
            >>> table[-2:]  # doctest: +NORMALIZE_WHITESPACE
            ['profile             est. ms  kernels  bound',
             'rx580                0.0324        3  overhead']
        """
        shapes = ", ".join("x".join(map(str, s)) for s in self.input_shapes) or "-"
        lat = self.latency
        lines = [
            f"model        : {self.model} (input {shapes})",
            f"params       : {self.params:,} ({self.trainable_params:,} trainable)",
            f"size         : {self.size_bytes / _MB:.3f} MB ("
            + ", ".join(f"{k} {v / _MB:.3f} MB" for k, v in self.storage.items())
            + ")",
            f"GFLOPs       : {self.flops / 1e9:.4f} ({self.macs / 1e9:.4f} GMACs)",
            f"latency here : {lat.median_s * 1e3:.3f} ms median, spread {lat.spread:.0%} "
            f"(p10-p90 {lat.p10_s * 1e3:.3f}-{lat.p90_s * 1e3:.3f} ms, n={lat.repeats}, "
            f"{lat.device}, {lat.threads} thread(s))",
            f"peak memory  : {self.memory.peak_bytes / _MB:.3f} MB ({self.memory.method})",
        ]
        if self.estimates:
            lines.append(f"{'profile':<16} {'est. ms':>10} {'kernels':>8}  bound")
            for name, est in self.estimates.items():
                lines.append(
                    f"{name:<16} {est.total_s * 1e3:>10.4f} {est.kernels:>8d}  {est.bound}"
                )
            lines += [f"note: {n}" for e in self.estimates.values() if (n := e.fit_note())]
        return "\n".join(lines)


def _model_device(model: nn.Module) -> torch.device | None:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return None


def profile_model(
    model: nn.Module,
    example_input: Any,
    *,
    device: str | torch.device,
    profiles: Sequence[str | DeviceProfile] | None = None,
    threads: int | None = None,
    warmup: int = 3,
    repeats: int = 10,
    min_time_s: float = 0.1,
) -> ModelProfile:
    """Measure ``model`` on ``example_input``: size, FLOPs, latency, memory, estimates.

    The model runs in eval mode on ``device`` (moved there for the measurement and back after;
    train/eval flags restored). Latency uses :func:`measure_latency` under
    ``torch.inference_mode``; peak memory is one more forward pass after the timed ones.

    Args:
        model: The module.
        example_input: A tensor, a tuple/list of positional arguments or a dict of keywords.
        device: Where to measure (``"auto"``, ``"cpu"``, ``"cuda:0"``...).
        profiles: Profile names or :class:`DeviceProfile` objects to estimate on (``None``:
            every registered one; ``"cpu"`` measures this CPU once per process).
        threads: CPU thread count for the measurement (``None``: the current one).
        warmup: Untimed calls before timing.
        repeats: Minimum timed calls.
        min_time_s: Minimum total timed time.

    Returns:
        A :class:`ModelProfile`.

    Raises:
        TypeError: ``model`` is not a module, or ``profiles`` is a string.
        ValueError: the device or a profile name is unknown, or the model is on the meta device.

    Example:
        >>> from slimtorch.models import create_model
        >>> model = create_model("resnet20", num_classes=10, in_channels=3, input_size=32)
        >>> p = profile_model(model, torch.randn(1, 3, 32, 32), device="cpu", profiles=["rx580"],
        ...     warmup=1, repeats=2, min_time_s=0)
        >>> p.params, p.flops, p.latency.repeats, list(p.estimates)
        (272474, 81626368, 2, ['rx580'])
        >>> model.training  # measured in eval mode, flags restored
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(profiles, str):  # would be read as one profile per character
        raise TypeError(f"profiles must be a list of profile names, got the string {profiles!r}")
    dev = resolve_device(device)
    known = list_profiles()
    wanted = known if profiles is None else list(profiles)
    for p in wanted:  # fail before any work; "cpu" is measured below, under `threads`
        if not isinstance(p, DeviceProfile) and p not in known:
            get_profile(p)  # raises, naming it and the registered ones
    on_meta = [n for n, t in model.state_dict().items() if t.is_meta]
    if on_meta:  # no values: .to(dev) would fail deep in torch, and nothing could be timed
        raise ValueError(
            f"the model has {len(on_meta)} tensor(s) on the meta device (no values), e.g. "
            f"{on_meta[0]!r}; load its weights first (count_flops and estimate_latency work on "
            "meta models and inputs)"
        )
    home = _model_device(model)
    flags = {name: m.training for name, m in model.named_modules()}
    x = tree_map(lambda t: t.to(dev) if isinstance(t, torch.Tensor) else t, example_input)
    shapes = tuple(tuple(t.shape) for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor))
    try:
        if home is not None and home != dev:
            model.to(dev)
        for m in model.modules():  # eval mode; exported programs refuse .eval() itself
            m.training = False
        with cpu_threads(threads):
            trace = trace_ops(model, x)
            report = flop_report_from_trace(trace)
            profs = [get_profile(p) for p in wanted]
            estimates = {prof.name: roofline_from_trace(trace, prof) for prof in profs}

            def run() -> None:
                call_with(model, x)

            with torch.inference_mode():
                latency = measure_latency(
                    run, device=dev, warmup=warmup, repeats=repeats, min_time_s=min_time_s
                )
                memory = measure_peak_memory(run, device=dev)
    finally:
        if home is not None and home != dev:
            model.to(home)
        for name, m in model.named_modules():
            m.training = flags.get(name, m.training)
    storage = storage_bytes(model)
    return ModelProfile(
        model=type(model).__name__,
        input_shapes=shapes,
        device=str(dev),
        params=count_params(model),
        trainable_params=count_params(model, trainable_only=True),
        size_bytes=sum(storage.values()),
        storage=storage,
        flops=report.total_flops,
        macs=report.total_macs,
        latency=latency,
        memory=memory,
        estimates=estimates,
    )


def format_ratio(before: float, after: float) -> str:
    """``after / before`` as a table cell (``"0.50x"``: halved; ``"-"`` for 0 / 0).

    Example:
        >>> format_ratio(4.0, 2.0), format_ratio(0.0, 1.0)
        ('0.50x', 'inf')
    """
    if before == 0:
        return "-" if after == 0 else "inf"
    return f"{after / before:.2f}x"


def compare_profiles(before: ModelProfile, after: ModelProfile) -> str:
    """A before/after table with ``after / before`` ratios (``0.50x``: halved).

    Rows: params, size, GFLOPs, measured latency here (median), peak memory, then the estimate on
    every profile both sides have.

    Example:
        >>> net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> x = torch.randn(8, 64)
        >>> kw = dict(device="cpu", profiles=["rx580"], warmup=1, repeats=3, min_time_s=0)
        >>> before = profile_model(net, x, **kw)
        >>> after = profile_model(net.half(), x.half(), **kw)  # the same weights in fp16
        >>> table = compare_profiles(before, after).splitlines()
        >>> table[0]
        'metric                           before        after    ratio'
        >>> table[2]  # half the bytes
        'size (MB)                         0.019        0.010    0.50x'
        >>> table[-1]  # fp16 computes at the fp32 rate on the RX 580
        'est. rx580 (ms)                  0.0301       0.0301    1.00x'
    """
    if not isinstance(before, ModelProfile) or not isinstance(after, ModelProfile):
        raise TypeError("compare_profiles expects two ModelProfile objects")
    rows: list[tuple[str, float, float, str]] = [
        ("params (M)", before.params / 1e6, after.params / 1e6, "{:.4f}"),
        ("size (MB)", before.size_bytes / _MB, after.size_bytes / _MB, "{:.3f}"),
        ("GFLOPs", before.flops / 1e9, after.flops / 1e9, "{:.4f}"),
        (
            f"latency {after.latency.device} (ms)",
            before.latency.median_s * 1e3,
            after.latency.median_s * 1e3,
            "{:.3f}",
        ),
        (
            "peak memory (MB)",
            before.memory.peak_bytes / _MB,
            after.memory.peak_bytes / _MB,
            "{:.3f}",
        ),
    ]
    for name, est in before.estimates.items():
        if name in after.estimates:
            rows.append(
                (
                    f"est. {name} (ms)",
                    est.total_s * 1e3,
                    after.estimates[name].total_s * 1e3,
                    "{:.4f}",
                )
            )
    lines = [f"{'metric':<26} {'before':>12} {'after':>12} {'ratio':>8}"]
    for label, b, a, fmt in rows:
        lines.append(f"{label:<26} {fmt.format(b):>12} {fmt.format(a):>12} {format_ratio(b, a):>8}")
    if before.latency.device != after.latency.device:
        lines.append(
            f"note: latency measured on {before.latency.device} before and "
            f"{after.latency.device} after; the ratio compares different devices"
        )
    for when, prof in (("before", before), ("after", after)):
        lines += [f"note ({when}): {n}" for e in prof.estimates.values() if (n := e.fit_note())]
    return "\n".join(lines)
