"""Is a factorised layer faster? Time it against the original, alone, on its real input shape.

Fewer FLOPs do not make a layer faster by themselves: a Tucker-2 conv runs three kernels where the
dense conv ran one, and its 1x1 convs are memory- and launch-bound, so on a big GPU at a small
batch the factorised layer can be slower. :func:`layer_speedup` answers the question per layer,
either by measuring both layers on the device at hand (median of interleaved runs, warm-up and
device synchronisation through :func:`~slimtorch.core.measure.measure_latency`) or by the
roofline estimate of both on a device profile (:func:`~slimtorch.core.measure.estimate_latency`)
for a device you do not have. ``decompose_`` uses it when ``config.min_speedup`` is set.

Measured runs are interleaved: round ``i`` times the original then the factorised layer (the
order swaps every round, ABBA...), each for a few calls, and each layer's figure is the median
over rounds, so drift on a noisy machine (clock changes, a neighbour's job) hits both alike.

Example:
    >>> conv = nn.Conv2d(8, 8, 3, padding=1)
    >>> check = layer_speedup(conv, conv, (1, 8, 8, 8), speed_on="rx580")
    >>> check.speedup, check.source
    (1.0, 'roofline:rx580')
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import statistics
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from slimtorch.core.measure import estimate_latency, measure_latency
from slimtorch.core.profiles import list_profiles

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SpeedCheck:
    """Time of the original and the factorised layer, and their ratio.

    Attributes:
        original_s: Seconds per call of the original layer (median, or roofline estimate).
        factorised_s: Seconds per call of the factorised layer.
        speedup: ``original_s / factorised_s`` (> 1: the factorised layer is faster).
        source: ``"measured:<device>"`` or ``"roofline:<profile>"``.
        faster_rounds: Measured: in how many of the rounds the factorised layer was the faster
            one (the rounds pair the two timings, so this is a sign test's count); None for
            roofline estimates.
        rounds: Measured: the number of rounds; None for roofline estimates.
    """

    original_s: float
    factorised_s: float
    speedup: float
    source: str
    faster_rounds: int | None = None
    rounds: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        return dataclasses.asdict(self)


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    if isinstance(input_shape, torch.Size):
        input_shape = tuple(input_shape)
    if (
        not isinstance(input_shape, tuple | list)
        or not input_shape
        or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in input_shape)
    ):
        raise ValueError(
            f"input_shape must be a non-empty tuple of ints >= 1 (the layer's input shape, "
            f"batch first), got {input_shape!r}"
        )
    return tuple(input_shape)


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _param_of(module: nn.Module) -> torch.Tensor | None:
    return next(module.parameters(), None)


def _on(module: nn.Module, device: torch.device) -> nn.Module:
    ref = _param_of(module)
    if ref is None or ref.device == device:
        return module
    return copy.deepcopy(module).to(device)


def layer_speedup(
    original: nn.Module,
    factorised: nn.Module,
    input_shape: Sequence[int],
    *,
    device: str | torch.device | None = None,
    speed_on: str = "measured",
    threads: int | None = None,
    repeats: int = 7,
    calls: int = 3,
    warmup: int = 2,
    seed: int = 0,
    channels_last: bool | str = False,
) -> SpeedCheck:
    """Time ``original`` and ``factorised`` on one random input of shape ``input_shape``.

    Args:
        original: The dense layer.
        factorised: Its replacement (same input and output shapes).
        input_shape: The layer's input shape, batch first (``decompose_`` records it with a
            forward hook on ``example_input``).
        device: Where to run (``None``: the original layer's device). Layers on another device
            are copied there; the given modules are never moved.
        speed_on: ``"measured"`` or a registered device profile name (roofline estimate; no
            timing, ``device``, ``threads`` and ``repeats`` are then unused).
        threads: CPU thread count for measured runs (``None``: keep the current one).
        repeats: Interleaved rounds (each layer's figure is the median over them), ``>= 1``.
        calls: Timed calls per layer per round, ``>= 1``.
        warmup: Untimed calls of each layer before the first round, ``>= 0``.
        seed: Seed of the random input.
        channels_last: Time on copies of both layers, and an input, in ``torch.channels_last``
            (NHWC) layout; only for 4-D inputs (ignored otherwise and by roofline estimates).
            ``"input"``: only the input (the modules are in that layout already).

    Returns:
        A :class:`SpeedCheck`.

    Raises:
        TypeError: a layer is not an ``nn.Module``.
        ValueError: a bad shape, count or profile name (named in the message).

    Example:
        >>> lin = nn.Linear(64, 64)
        >>> check = layer_speedup(lin, LowRankLinear.from_layer(lin, 8), (4, 64), repeats=2)
        >>> check.source, check.original_s > 0
        ('measured:cpu', True)
    """
    for arg, module in (("original", original), ("factorised", factorised)):
        if not isinstance(module, nn.Module):
            raise TypeError(f"{arg} must be an nn.Module, got {type(module).__name__}")
    shape = _check_shape(input_shape)
    _check_int("repeats", repeats, 1)
    _check_int("calls", calls, 1)
    _check_int("warmup", warmup, 0)
    if not isinstance(speed_on, str) or not speed_on:
        raise ValueError(f"speed_on must be 'measured' or a profile name, got {speed_on!r}")
    if speed_on != "measured" and speed_on not in list_profiles():
        raise ValueError(
            f"speed_on must be 'measured' or a registered profile ({', '.join(list_profiles())}), "
            f"got {speed_on!r}"
        )
    ref = _param_of(original)
    faster_rounds: int | None = None
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    if device is not None:
        dev = torch.device(device)
    else:
        dev = ref.device if ref is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=dtype).to(dev)  # (B, ...) the layer's input
    if speed_on != "measured":
        x = x.to(ref.device if ref is not None else torch.device("cpu"))  # traced where it lives
        a_s = estimate_latency(original, x, speed_on).total_s
        b_s = estimate_latency(factorised, x, speed_on).total_s
        source = f"roofline:{speed_on}"
    else:
        a_mod, b_mod = _on(original, dev), _on(factorised, dev)
        if channels_last and x.ndim == 4:
            fmt = torch.channels_last
            x = x.contiguous(memory_format=fmt)
            if channels_last != "input":
                a_mod = copy.deepcopy(a_mod).to(memory_format=fmt)  # type: ignore[call-overload]
                b_mod = copy.deepcopy(b_mod).to(memory_format=fmt)  # type: ignore[call-overload]
            source_tag = ",channels_last"
        else:
            source_tag = ""
        a_times: list[float] = []
        b_times: list[float] = []
        pair = ((a_mod, a_times), (b_mod, b_times))
        for module, _ in pair:
            measure_latency(
                module, x, device=dev, warmup=warmup, repeats=1, min_time_s=0.0, threads=threads
            )  # warmed at the timed thread count: compiled modules guard on it
        for i in range(repeats):
            for module, times in pair if i % 2 == 0 else pair[::-1]:
                r = measure_latency(
                    module, x, device=dev, warmup=0, repeats=calls, min_time_s=0.0, threads=threads
                )
                times.append(r.median_s)
        a_s, b_s = statistics.median(a_times), statistics.median(b_times)
        faster_rounds = sum(b < a for a, b in zip(a_times, b_times, strict=True))
        source = f"measured:{dev}{source_tag}"
    speedup = a_s / b_s if b_s > 0 else float("inf")
    logger.debug(
        "speed %s vs %s: %.3g s -> %.3g s (%.2fx, %s)",
        type(original).__name__,
        type(factorised).__name__,
        a_s,
        b_s,
        speedup,
        source,
    )
    rounds = repeats if faster_rounds is not None else None
    return SpeedCheck(float(a_s), float(b_s), float(speedup), source, faster_rounds, rounds)


__all__ = ["SpeedCheck", "layer_speedup"]
