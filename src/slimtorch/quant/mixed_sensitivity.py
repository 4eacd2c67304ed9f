"""Per-layer precision sensitivity, weight scales and per-candidate costs for mixed precision.

Sensitivity of a layer to a candidate precision is measured by simulating that precision on
that layer alone and comparing the model's outputs on calibration data with the float32 ones:

- ``"int8"``/``"int4"``: the weight is replaced by its per-channel symmetric fake-quantized
  version (weight-only, as :func:`slimtorch.quant.to_qdq_` stores it with ``input_scale=None``);
- ``"fp16"``: the weight, bias, input and output of the layer are rounded to float16, so values
  beyond float16's range (+-65504) become inf as in a float16 layer, and the loss is infinite;
- ``"fp32"``: no change (loss 0).

The loss is the squared relative output error (``metric="output_error"``; noise power, which
adds up over layers when their rounding noises are independent) or the top-1 accuracy drop on
labelled data (``metric="accuracy"``, with the squared error added at 1e-3 weight to break
ties between layers that do not flip a single prediction).

Example:
    >>> from slimtorch.models import create_model
    >>> model = create_model("lenet5", in_channels=1, input_size=28).eval()
    >>> x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    >>> sens = measure_sensitivity(model, ["features.0", "classifier"], (x, y))
    >>> sens["classifier"]["int4"] >= sens["classifier"]["int8"]
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from slimtorch.core.measure import estimate_latency
from slimtorch.core.profiles import get_profile
from slimtorch.quant import _calib

CANDIDATES = ("fp32", "fp16", "int8", "int4")
BITS = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4}


def weight_scales(w: torch.Tensor, bits: int, method: str = "mse", grid: int = 20) -> torch.Tensor:
    """Per-output-channel symmetric scales ``(C_out,)`` for ``bits``-bit weights.

    ``"minmax"``: ``max|w| / qmax``. ``"mse"``: the clipping ``alpha * max|w|`` (``alpha`` on a
    grid in [0.5, 1]) that minimises each channel's squared quantization error, which matters at
    4 bits where a few large weights would otherwise waste most levels.

    Example:
        >>> weight_scales(torch.tensor([[1.0, -0.5], [0.1, 0.0]]), 8, "minmax").tolist()
        [0.007874015718698502, 0.0007874015718698502]
    """
    if method not in ("mse", "minmax"):
        raise ValueError(f"method must be 'mse' or 'minmax', got {method!r}")
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    flat = w.detach().float().reshape(w.shape[0], -1)  # (C_out, fan_in)
    amax = flat.abs().amax(dim=1).clamp_min(1e-12)  # (C_out,)
    best = amax / qmax
    if method == "minmax":
        return best
    best_err = torch.full_like(amax, math.inf)
    for alpha in torch.linspace(0.5, 1.0, grid + 1).tolist():
        scale = (alpha * amax / qmax)[:, None]  # (C_out, 1)
        err = ((torch.clamp(torch.round(flat / scale), qmin, qmax) * scale - flat) ** 2).sum(1)
        better = err < best_err
        best = torch.where(better, scale[:, 0], best)
        best_err = torch.where(better, err, best_err)
    return best


def fake_quant_weight(w: torch.Tensor, bits: int, scale: torch.Tensor) -> torch.Tensor:
    """``w`` quantized per output channel with ``scale`` (symmetric, signed) and dequantized."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    s = scale.reshape((-1,) + (1,) * (w.ndim - 1)).to(w.dtype)
    return torch.clamp(torch.round(w / s), qmin, qmax) * s


def layer_bytes(module: nn.Module, candidate: str) -> int:
    """Deployed bytes of a Conv2d/Linear layer at ``candidate`` precision.

    Weights at ``bits / 8`` bytes each (int4 packed two per byte), plus float32 per-channel
    scales for int8/int4, plus the bias (float32, float16 for fp16).

    Example:
        >>> layer_bytes(nn.Linear(8, 4), "int4")  # 16 weight bytes + 16 scale + 16 bias
        48
    """
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    bias = getattr(module, "bias", None)
    n_bias = 0 if bias is None else bias.numel()
    c_out = weight.shape[0]
    if candidate in ("fp32", "fp16"):
        size = BITS[candidate] // 8
        return (weight.numel() + n_bias) * size
    return math.ceil(weight.numel() * BITS[candidate] / 8) + 4 * c_out + 4 * n_bias


def _round16(a: Any) -> Any:
    return a.half().float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a


class _InputRound:
    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(_round16(a) for a in args)


class _OutputRound:
    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        return _round16(output)


def _loss(
    outs: list[torch.Tensor], refs: list[torch.Tensor], batches: list[Any], metric: str
) -> float:
    err2 = _calib.rel_error(outs, refs) ** 2
    if metric == "output_error":
        return err2
    acc_ref = _calib.accuracy(refs, batches)
    acc = _calib.accuracy(outs, batches)
    assert acc_ref is not None and acc is not None
    return max(0.0, acc_ref - acc) + 1e-3 * err2


@torch.no_grad()
def measure_sensitivity(
    model: nn.Module,
    layers: Sequence[str],
    calibration: Any,
    *,
    candidates: Sequence[str] = ("fp16", "int8", "int4"),
    metric: str = "output_error",
    scale_method: str = "mse",
    max_batches: int | None = None,
    scales: dict[tuple[str, int], torch.Tensor] | None = None,
) -> dict[str, dict[str, float]]:
    """Loss per layer per candidate precision, each layer changed alone (see module docstring).

    Args:
        model: The float32 model (left as it was).
        layers: Dotted names of Conv2d/Linear layers.
        calibration: A tensor, an ``(inputs, labels)`` pair or an iterable of either.
        candidates: Precisions among ``fp32``, ``fp16``, ``int8``, ``int4``.
        metric: ``"output_error"`` or ``"accuracy"`` (needs labels).
        scale_method: Weight scales, ``"mse"`` or ``"minmax"`` (see :func:`weight_scales`).
        max_batches: Use at most this many calibration batches.
        scales: A cache ``{(layer, bits): scale}`` read and filled with the weight scales used
            (so a caller quantizing the same layers afterwards reuses them).

    Returns:
        ``{layer: {candidate: loss}}``.

    Raises:
        ValueError: Unknown layer/candidate/metric, bad calibration data, or ``"accuracy"``
            without labels.
        CalibrationError: The float model gives NaN/Inf outputs on the calibration data.

    Example:
        >>> net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> sens = measure_sensitivity(net, ["0"], torch.randn(8, 16), candidates=("fp32", "int8"))
        >>> sens["0"]["fp32"], 0.0 < sens["0"]["int8"] < 1e-3
        (0.0, True)
    """
    bad = [c for c in candidates if c not in CANDIDATES]
    if bad or not candidates:
        raise ValueError(f"candidates must be a non-empty subset of {CANDIDATES}, got {candidates}")
    if metric not in ("output_error", "accuracy"):
        raise ValueError(f"metric must be 'output_error' or 'accuracy', got {metric!r}")
    batches = _calib.as_batches(calibration, "calibration", max_batches)
    if metric == "accuracy" and any(y is None for _, y in batches):
        raise ValueError(
            "metric='accuracy' needs labelled calibration data ((inputs, labels) batches); "
            "pass labels or use metric='output_error'"
        )
    modules = dict(model.named_modules())
    for name in layers:
        mod = modules.get(name)
        if not isinstance(mod, nn.Conv2d | nn.Linear):
            raise ValueError(
                f"{name!r} is not a Conv2d/Linear layer of {type(model).__name__} "
                f"(found {type(mod).__name__}); pass dotted names of conv/linear layers"
            )
    refs = _calib.run_batches(model, batches, "calibration")
    out: dict[str, dict[str, float]] = {}
    for name in layers:
        mod = modules[name]
        original = mod.weight.data
        bias = mod.bias.data if isinstance(mod.bias, torch.Tensor) else None
        out[name] = {}
        for cand in candidates:
            if cand == "fp32":
                out[name][cand] = 0.0
                continue
            handles = []
            if cand == "fp16":
                mod.weight.data = original.half().float()
                if bias is not None:
                    mod.bias.data = bias.half().float()
                handles.append(mod.register_forward_pre_hook(_InputRound()))
                handles.append(mod.register_forward_hook(_OutputRound()))
            else:
                bits = BITS[cand]
                cache = {} if scales is None else scales
                if (name, bits) not in cache:
                    cache[name, bits] = weight_scales(original, bits, scale_method)
                mod.weight.data = fake_quant_weight(original, bits, cache[name, bits])
            try:
                outs = _calib.run_batches(model, batches, "calibration")
                out[name][cand] = _loss(outs, refs, batches, metric)
            except _calib.CalibrationError:
                out[name][cand] = math.inf
            finally:
                mod.weight.data = original
                if bias is not None:
                    mod.bias.data = bias
                for h in handles:
                    h.remove()
    return out


def latency_costs(
    model: nn.Module, names: list[str], example: torch.Tensor, profile: str, cands: tuple[str, ...]
) -> tuple[dict[str, dict[str, float]], float, float, float]:
    """Per-layer roofline time per candidate, the rest of the model's time (as it is in fp32,
    and the least it can be: with fp16 activations, when fp16 is a candidate), the fp32 total.

    Each layer's time at a candidate is ``max(flops / rate, bytes / bandwidth) + launch`` on
    ``profile`` with the activations and weight in the candidate's dtype (fp16 at the profile's
    fp16 rate); int8/int4 layers are weight-only, so they compute in fp32 after a dequantize
    kernel that reads the packed weight and writes a float32 one. The rest of the model is its
    roofline estimate minus the targeted layers' rows.

    Example:
        >>> net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> x = torch.randn(4, 16)
        >>> per_layer, rest, least, total = latency_costs(net, ["0"], x, "rx580", ("fp16", "int8"))
        >>> sorted(per_layer["0"]), 0.0 < least <= rest < total
        (['fp16', 'int8'], True)
        >>> per_layer["0"]["int8"] > per_layer["0"]["fp16"]  # int8 adds a dequantize kernel
        True
    """
    prof = get_profile(profile)
    shapes: dict[str, tuple[int, int]] = {}
    handles = []
    for n in names:

        def hook(m: nn.Module, a: Any, o: Any, n: str = n) -> None:
            shapes[n] = (a[0].numel(), o.numel())

        handles.append(model.get_submodule(n).register_forward_hook(hook))
    est = estimate_latency(model, example, prof)
    for h in handles:
        h.remove()
    rows = {r.name: r.total_s for r in est.rows}
    rest = est.total_s - sum(rows.get(n, 0.0) for n in names)
    if "fp16" in cands:  # the rest runs on fp16 activations where fp16 layers feed it
        half = estimate_latency(model, example, prof, dtype=torch.float16)
        low = {r.name: r.total_s for r in half.rows}
        rest_low = min(rest, half.total_s - sum(low.get(n, 0.0) for n in names))
    else:
        rest_low = rest
    out: dict[str, dict[str, float]] = {}
    for n in names:
        weight = model.get_submodule(n).weight
        assert isinstance(weight, torch.Tensor)
        n_in, n_out = shapes.get(n, (0, 0))
        w = weight.numel()
        flops = 2.0 * n_out * (w // weight.shape[0])  # per output element: fan-in MACs
        out[n] = {}
        for c in cands:
            act = 2 if c == "fp16" else 4
            rate = prof.peak_rate("fp16" if c == "fp16" else "fp32")
            moved = (n_in + n_out) * act + w * min(act, 4)
            t: float = max(flops / rate, moved / prof.memory_bandwidth) + prof.launch_overhead_s
            if c in ("int8", "int4"):  # weight-only: a dequantize kernel before the fp32 op
                t += w * (BITS[c] / 8 + 4) / prof.memory_bandwidth + prof.launch_overhead_s
            out[n][c] = t
    return out, max(rest, 0.0), max(rest_low, 0.0), est.total_s


def _saving(delta: float, unit: str) -> str:
    """``delta`` of the budget's unit: whole bytes, or seconds shown in microseconds."""
    return f"{round(delta):,} bytes" if unit == "bytes" else f"{delta * 1e6:.3g} us"


def choice_reason(
    choice: str,
    losses: dict[str, float],
    costs: dict[str, float],
    floor: str | None,
    note: str,
    unit: str = "bytes",
) -> str:
    """Why a layer got ``choice``: its loss, the next cheaper option, the first/last floor and
    the options ruled out by NaN/Inf outputs, then ``note``; ``costs`` are in ``unit``
    (``"bytes"`` for a size budget, ``"s"`` for a latency one).

    Example:
        >>> losses, sizes = {"fp16": 1e-8, "int4": 2e-3}, {"fp16": 18496.0, "int4": 4866.0}
        >>> choice_reason("fp16", losses, sizes, None, "").split("; ")[1]
        'int4 saves 13,630 bytes more but adds loss 0.002, not worth it within the budget'
    """
    cheaper = sorted((c for c in costs if costs[c] < costs[choice]), key=lambda c: costs[c])
    text = f"{choice}: predicted loss {losses[choice]:.3g}"
    if cheaper:
        alt = cheaper[0]
        text += f"; {alt} saves {_saving(costs[choice] - costs[alt], unit)} more but adds loss "
        text += f"{losses[alt] - losses[choice]:.3g}, not worth it within the budget"
    else:
        text += "; cheapest allowed option"
    if floor is not None:
        text += f" (first/last layer: at least {floor})"
    for c in (c for c in costs if math.isinf(losses[c]) and c != choice):
        text += f"; {c} ruled out: the model's outputs turn NaN/Inf with this layer in {c}"
        text += " (values beyond float16's range of +-65504)" if c == "fp16" else ""
    return text + note
