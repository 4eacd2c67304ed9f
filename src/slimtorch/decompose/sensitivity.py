"""Per-layer sensitivity to low-rank approximation: how much the loss rises when one layer alone is
replaced by its rank-``fraction`` approximation.

The numbers weight each layer's reconstruction error in budget mode (``rank="budget:..."``), so
the budget is spent on the layers whose approximation hurts most. The approximation is put in
place of the layer's weight and the original weight is restored afterwards, whatever happens:
Tucker-2 (truncated HOSVD) for dense spatial convs, truncated SVD for linear layers, 1x1 and
grouped convs (of the ``(C_out, C_in/groups * kh * kw)`` matrix).

Example:
    >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    >>> batch = (torch.randn(16, 8), torch.randn(16, 1))
    >>> s = measure_sensitivity(net, ["0", "2"], batch, nn.functional.mse_loss)
    >>> sorted(s)
    ['0', '2']
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from slimtorch.core.surgery import kept_modes
from slimtorch.decompose.ranks import rank_from_fraction
from slimtorch.decompose.svd import truncated_svd
from slimtorch.decompose.tucker import tucker2, tucker2_to_full

logger = logging.getLogger(__name__)

LossFn = Callable[[Any, Any], torch.Tensor]


def approximate_weight(module: nn.Module, fraction: float = 0.25) -> torch.Tensor:
    """The rank-``fraction`` approximation of ``module.weight`` (same shape, dtype, device).

    Example:
        >>> approximate_weight(nn.Linear(8, 4), 0.25).shape
        torch.Size([4, 8])
    """
    if not isinstance(module, nn.Linear | nn.Conv2d):
        raise TypeError(
            f"measure_sensitivity handles nn.Linear and nn.Conv2d layers, got "
            f"{type(module).__name__}; leave it out of layer_names"
        )
    w = module.weight.detach()
    work = w.to(torch.float64)
    spatial = isinstance(module, nn.Conv2d) and module.groups == 1 and w[0, 0].numel() > 1
    if spatial:
        ranks = (rank_from_fraction(w.shape[0], fraction), rank_from_fraction(w.shape[1], fraction))
        approx = tucker2_to_full(*tucker2(work, ranks, n_iter=0))
    else:
        matrix = work.reshape(w.shape[0], -1)  # (C_out, rest)
        a, b = truncated_svd(matrix, rank_from_fraction(min(matrix.shape), fraction))
        approx = (a @ b).reshape(w.shape)
    return approx.to(w.dtype)


def _batches(loader_or_batch: Any) -> Iterable[Any]:
    if isinstance(loader_or_batch, tuple | list) and (
        len(loader_or_batch) == 2 and isinstance(loader_or_batch[0], torch.Tensor)
    ):
        return [loader_or_batch]
    return loader_or_batch


def _mean_loss(
    model: nn.Module,
    loader_or_batch: Any,
    loss_fn: LossFn,
    device: torch.device,
    max_batches: int | None,
) -> float:
    total, count = 0.0, 0
    for i, batch in enumerate(_batches(loader_or_batch)):
        if max_batches is not None and i >= max_batches:
            break
        if not isinstance(batch, tuple | list) or len(batch) != 2:
            raise TypeError(
                f"loader_or_batch must be an (inputs, targets) pair or yield such pairs, got a "
                f"{type(batch).__name__}"
            )
        inputs, targets = (x.to(device) if isinstance(x, torch.Tensor) else x for x in batch)
        total += float(loss_fn(model(inputs), targets))
        count += 1
    if count == 0:
        raise ValueError("loader_or_batch yielded no batches; give at least one (inputs, targets)")
    return total / count


def measure_sensitivity(
    model: nn.Module,
    layer_names: Sequence[str],
    loader_or_batch: Any,
    loss_fn: LossFn,
    *,
    fraction: float = 0.25,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Loss increase when each named layer alone is replaced by its rank-``fraction`` version.

    The model runs in eval mode without gradients (modes restored); every weight is restored
    after its layer is measured. The same batches are used for the baseline and every layer, so
    pass a loader with a fixed order (or one batch).

    Args:
        model: The model (weights unchanged on return).
        layer_names: Dotted names of ``nn.Linear``/``nn.Conv2d`` layers.
        loader_or_batch: One ``(inputs, targets)`` pair or an iterable of them.
        loss_fn: ``loss_fn(outputs, targets) -> scalar tensor`` (mean over the batch).
        fraction: Share of each mode's rank kept, in ``(0, 1]``.
        max_batches: Use at most this many batches of a loader (``None``: all).

    Returns:
        ``{name: loss_with_approximation - baseline_loss}``; can be slightly negative when the
        approximation happens to help.

    Raises:
        TypeError: a named module is not a linear or conv layer, or batches are malformed.
        ValueError: a name is unknown, ``fraction`` is out of range, or there are no batches.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4))
        >>> s = measure_sensitivity(net, ["0"], (torch.randn(8, 4), torch.zeros(8, 4)),
        ...     nn.functional.mse_loss, fraction=1.0)
        >>> abs(s["0"]) < 1e-6
        True
    """
    if isinstance(fraction, bool) or not isinstance(fraction, int | float):
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ValueError(f"max_batches must be None or an int >= 1, got {max_batches!r}")
    if isinstance(layer_names, str) or not all(isinstance(n, str) for n in layer_names):
        raise TypeError(f"layer_names must be a list of dotted names, got {layer_names!r}")
    modules: dict[str, nn.Module] = {}
    for name in layer_names:
        try:
            modules[name] = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"layer_names holds {name!r}, which is not a submodule of "
                f"{type(model).__name__}; list names with model.named_modules()"
            ) from None
    ref = next(model.parameters(), None)
    device = ref.device if ref is not None else torch.device("cpu")
    out: dict[str, float] = {}
    with kept_modes(model), torch.no_grad():
        base = _mean_loss(model, loader_or_batch, loss_fn, device, max_batches)
        for name, module in modules.items():
            approx = approximate_weight(module, fraction)
            weight = module.get_parameter("weight")
            saved = weight.detach().clone()
            try:
                weight.copy_(approx)
                loss = _mean_loss(model, loader_or_batch, loss_fn, device, max_batches)
            finally:
                weight.copy_(saved)
            out[name] = loss - base
            logger.info("sensitivity %s: loss %.5g -> %.5g", name, base, loss)
    return out


__all__ = ["approximate_weight", "measure_sensitivity"]
