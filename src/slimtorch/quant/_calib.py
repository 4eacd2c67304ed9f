"""Check and calibration data for low-precision casts and mixed precision: parse, run, compare.

Data may be given as one tensor (one unlabelled batch), one ``(inputs, labels)`` pair, or an
iterable of either (a loader). Every batch is checked (non-empty, float or int32/int64 indices,
finite, one shape past the batch dimension) before the model runs; a batch the float model
rejects raises ``ValueError`` naming the shape, and NaN/Inf outputs raise
:class:`~slimtorch.quant.lsq.CalibrationError`. Whether data fits is judged on the float model
only: a changed copy (cast, quantized) run with ``trial=True`` that fails on data its float
original ran raises :class:`TrialError`, which blames the change, not the data.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from slimtorch.core.errors import SlimtorchError
from slimtorch.core.surgery import kept_modes, nonfinite_tensors
from slimtorch.quant.lsq import CalibrationError

Batch = tuple[torch.Tensor, torch.Tensor | None]
# integer inputs taken as indices (token ids for an embedding); uint8 reads as raw pixels
INDEX_DTYPES = (torch.int32, torch.int64)

ONE_INPUT = (
    " (each batch is one input tensor, or an (inputs, labels) pair: a model taking several "
    "inputs cannot be run on it)"
)


class TrialError(SlimtorchError):
    """A changed copy of a model (cast, quantized) fails to run on data its float original ran."""


def _is_labelled_pair(obj: Any) -> bool:
    return (
        isinstance(obj, tuple | list)
        and len(obj) == 2
        and isinstance(obj[0], torch.Tensor)
        and isinstance(obj[1], torch.Tensor)
        and not obj[1].is_floating_point()
        and obj[1].ndim == 1
        and obj[0].ndim >= 1
        and obj[1].shape[0] == obj[0].shape[0]
    )


def _one(obj: Any, what: str, i: int) -> Batch:
    if isinstance(obj, torch.Tensor):
        return obj, None
    if _is_labelled_pair(obj):
        return obj[0], obj[1]
    if (
        isinstance(obj, tuple)
        and len(obj) == 2
        and isinstance(obj[0], torch.Tensor)
        and obj[1] is None
    ):
        return obj[0], None
    raise TypeError(
        f"{what} batch {i} is a {type(obj).__name__}; expected a tensor or an (inputs, int64 "
        "labels) pair"
    )


def as_batches(
    data: Any, what: str = "calibration data", max_batches: int | None = None
) -> list[Batch]:
    """Normalise ``data`` into a list of ``(inputs, labels or None)`` and validate it.

    Raises:
        TypeError: An item is neither a tensor nor an (inputs, labels) pair.
        ValueError: No batches, an empty or non-floating batch, NaN/Inf inputs, or batches of
            different shapes.

    Example:
        >>> [x.shape for x, _ in as_batches(torch.randn(4, 3))]
        [torch.Size([4, 3])]
    """
    if data is None:
        raise ValueError(f"{what} is None; pass a tensor, an (inputs, labels) pair or a loader")
    if isinstance(data, torch.Tensor) or _is_labelled_pair(data):
        batches = [_one(data, what, 0)]
    elif isinstance(data, Iterable):
        batches = []
        for i, item in enumerate(data):
            if max_batches is not None and i >= max_batches:
                break
            batches.append(_one(item, what, i))
    else:
        raise TypeError(
            f"{what} must be a tensor, an (inputs, labels) pair or an iterable of those, got "
            f"{type(data).__name__}"
        )
    if not batches:
        raise ValueError(f"{what} is empty; give at least one batch of real inputs")
    shape = None
    for i, (x, _) in enumerate(batches):
        if x.is_meta:
            raise ValueError(f"{what} batch {i} is on the meta device and holds no values")
        if x.ndim == 0 or x.shape[0] == 0 or x.numel() == 0:
            raise ValueError(f"{what} batch {i} is empty (shape {tuple(x.shape)}); drop it")
        if not x.is_floating_point() and x.dtype not in INDEX_DTYPES:
            raise ValueError(
                f"{what} batch {i} has dtype {x.dtype}; expected float inputs as the model "
                "takes them (normalised images, not uint8 pixels), or int32/int64 token ids"
            )
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{what} batch {i} holds NaN/Inf values; clean the data first")
        if shape is None:
            shape = tuple(x.shape[1:])
        elif tuple(x.shape[1:]) != shape:
            raise ValueError(
                f"{what} batch {i} has per-sample shape {tuple(x.shape[1:])} but batch 0 has "
                f"{shape}; all batches must share one shape"
            )
    return batches


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU if it has none)."""
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def track_calls(model: nn.Module, modules: dict[str, nn.Module]) -> Iterator[list[list[str]]]:
    """Record which of ``modules`` each forward pass of ``model`` calls, in first-call order.

    Yields a list that gets one list of names per forward pass of ``model`` run inside the
    ``with`` block (the hooks are removed on exit).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        >>> with track_calls(net, dict(net.named_children())) as runs:
        ...     _ = run_batches(net, as_batches(torch.randn(3, 2)))
        >>> runs
        [['0', '1']]
    """
    runs: list[list[str]] = []
    handles = [model.register_forward_pre_hook(lambda _m, _a: runs.append([]))]
    for name, module in modules.items():

        def pre(_m: nn.Module, _a: Any, name: str = name) -> None:
            if runs and name not in runs[-1]:
                runs[-1].append(name)

        handles.append(module.register_forward_pre_hook(pre))
    try:
        yield runs
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def broken_tensors(model: nn.Module) -> str:
    """A note naming the model's floating parameters/buffers that hold NaN/Inf (the cause of
    NaN activations, which are seen only downstream of them), or ``""``.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
        >>> _ = net[2].bias.data.fill_(float("nan"))
        >>> broken_tensors(net)
        '; the model itself holds NaN/Inf in 2.bias'
    """
    bad = nonfinite_tensors(model)
    more = f" (+{len(bad) - 6} more)" if len(bad) > 6 else ""
    return f"; the model itself holds NaN/Inf in {', '.join(bad[:6])}{more}" if bad else ""


def run_batches(
    model: nn.Module, batches: list[Batch], what: str = "calibration data", *, trial: bool = False
) -> list[torch.Tensor]:
    """Outputs of ``model`` (eval mode, flag restored) on every batch, as float32 on the CPU.

    Args:
        model: The model to run.
        batches: From :func:`as_batches`.
        what: How messages name the data.
        trial: ``model`` is a changed copy of a float model that ran these batches: an error
            while it runs is the change's fault and raises :class:`TrialError`.

    Raises:
        ValueError: The model rejects a batch (wrong shape or channels; not with ``trial``).
        TrialError: With ``trial``, the model fails on a batch (a dtype clash, say).
        CalibrationError: An output holds NaN/Inf.
    """
    device = model_device(model)
    outs = []
    with kept_modes(model):
        for i, (x, _) in enumerate(batches):
            try:
                y = model(x.to(device))
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                if trial:
                    raise TrialError(
                        f"{type(exc).__name__} on {what} batch {i}: {str(exc).splitlines()[0]}"
                    ) from None
                raise ValueError(
                    f"{what} batch {i} of shape {tuple(x.shape)} and dtype {x.dtype} does not "
                    f"fit the model ({type(exc).__name__}: {str(exc).splitlines()[0]}); give "
                    f"inputs of the shape and dtype the model was built for{ONE_INPUT}"
                ) from None
            if not isinstance(y, torch.Tensor):
                raise TypeError(f"the model returned a {type(y).__name__}; expected one tensor")
            y = y.detach().float().cpu()
            if not bool(torch.isfinite(y).all()):
                raise CalibrationError(
                    f"the model produced NaN/Inf outputs on {what} batch {i}; check the inputs "
                    f"and the weights (activations overflow or the model is broken)"
                    f"{broken_tensors(model)}"
                )
            outs.append(y)
    return outs


def rel_error(outs: list[torch.Tensor], refs: list[torch.Tensor]) -> float:
    """``||y - y_ref|| / ||y_ref||`` over all batches (inf if any output is not finite).

    Computed in float64 on values divided by the largest magnitude, so outputs far beyond
    float32's square root of its range (~1e19) do not overflow.

    Example:
        >>> rel_error([torch.tensor([2e30])], [torch.tensor([1e30])])
        1.0
    """
    pairs = list(zip(outs, refs, strict=True))
    if not all(bool(torch.isfinite(o).all()) for o, _ in pairs):
        return math.inf
    scale = max((float(t.abs().max()) for o, r in pairs for t in (o, r) if t.numel()), default=0.0)
    if scale == 0.0:
        return 0.0
    num = sum(float((o.double() / scale - r.double() / scale).pow(2).sum()) for o, r in pairs)
    den = sum(float((r.double() / scale).pow(2).sum()) for _, r in pairs)
    if den == 0.0:
        return math.inf if num > 0.0 else 0.0
    return math.sqrt(num / den)


def accuracy(outs: list[torch.Tensor], batches: list[Batch]) -> float | None:
    """Top-1 accuracy (fraction) when every batch is labelled, else ``None``."""
    if any(y is None for _, y in batches):
        return None
    correct = 0
    for o, (_, y) in zip(outs, batches, strict=True):
        assert y is not None
        correct += int((o.argmax(dim=1) == y.cpu()).sum())
    total = sum(int(y.shape[0]) for _, y in batches if y is not None)
    return correct / total


def agreement(outs: list[torch.Tensor], refs: list[torch.Tensor]) -> float | None:
    """Fraction of samples whose top-1 class matches the reference (``None`` for 1-D outputs)."""
    if outs[0].ndim < 2:
        return None
    same = sum(int((o.argmax(1) == r.argmax(1)).sum()) for o, r in zip(outs, refs, strict=True))
    return same / sum(int(r.shape[0]) for r in refs)
