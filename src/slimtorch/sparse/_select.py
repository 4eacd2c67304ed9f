"""Layer selection by dotted-name globs, shared by the sparse training and sparse-kernel code."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from slimtorch.core.globs import check_globs, check_include_hits, selected

TARGET_TYPES = (nn.Conv2d, nn.Linear)


def select_layers(
    model: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] | None = None
) -> list[tuple[str, nn.Module]]:
    """The ``nn.Conv2d``/``nn.Linear`` layers matching ``include`` and none of ``exclude``.

    Raises:
        TypeError: a glob list is not a list of strings.
        ValueError: a glob matches no module, or an ``include`` glob selects no layer.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> [n for n, _ in select_layers(net, exclude=["2"])]
        ['0']
    """
    check_globs(model, include, exclude)
    out: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not name or not isinstance(module, TARGET_TYPES):
            continue
        if not selected(name, include, exclude):
            continue
        out.append((name, module))
    check_include_hits(model, include, [name for name, _ in out], "nn.Conv2d/nn.Linear")
    return out


def layer_weight(module: nn.Module) -> torch.Tensor:
    """``module.weight`` as a tensor (raises ``TypeError`` if the module has none).

    Example:
        >>> layer_weight(nn.Linear(2, 3)).shape
        torch.Size([3, 2])
    """
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return w
