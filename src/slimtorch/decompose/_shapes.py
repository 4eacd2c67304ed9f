"""Shapes seen by targeted layers on an example input, and per-sample FLOPs from them.

Example:
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3))
    >>> shapes = record_shapes(net, [("1", net[1])], torch.randn(2, 3, 10, 10))
    >>> shapes["1"], layer_flops(net[1], shapes["1"], 2)
    (((2, 8, 8, 8), (2, 8, 6, 6)), 41472)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from slimtorch.core.surgery import kept_modes
from slimtorch.decompose.layers._common import conv_out_hw

Shapes = tuple[tuple[int, ...], tuple[int, ...]]
"""``(input shape, output shape)`` of one call of a layer."""


def record_shapes(
    model: nn.Module, targets: list[tuple[str, nn.Module]], example_input: Any
) -> dict[str, Shapes]:
    """Run ``example_input`` once (eval mode, no gradients, modes restored) and record the input
    and output shapes of each target's first call."""
    shapes: dict[str, Shapes] = {}
    hooks = []
    for name, module in targets:

        def hook(mod: nn.Module, args: tuple[Any, ...], out: Any, name: str = name) -> None:
            if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                shapes.setdefault(name, (tuple(args[0].shape), tuple(out.shape)))

        hooks.append(module.register_forward_hook(hook))
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    try:
        with kept_modes(model), torch.no_grad():
            model(*inputs)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:  # before any change
        what = ", ".join(
            f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            for x in inputs
        )
        raise ValueError(
            f"example_input ({what}) does not run through {type(model).__name__} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); give one "
            "batch of the model's real inputs (a tensor, or a tuple of its positional inputs)"
        ) from exc
    finally:
        for h in hooks:
            h.remove()
    return shapes


def layer_flops(module: nn.Module, shapes: Shapes | None, batch: int) -> int | None:
    """Per-sample FLOPs of ``module`` (original or factorised) given its recorded shapes."""
    kind = getattr(module, "flops_input", None)
    if isinstance(module, nn.Linear) or kind == "rows":
        rows = 1 if shapes is None else math.prod(shapes[1][:-1]) // max(batch, 1)
        if isinstance(module, nn.Linear):
            return 2 * module.in_features * module.out_features * rows
        return int(module.flops(rows))  # type: ignore[operator]
    if shapes is None or len(shapes[0]) < 3:
        return None
    if isinstance(module, nn.modules.conv._ConvNd) and not isinstance(module, nn.Conv2d):
        # Conv1d/3d, transposed convs: never factorised, counted so a FLOPs budget covers them
        k = math.prod(module.kernel_size) * 2
        if module.transposed:  # every input position spreads over the kernel
            per = module.in_channels * (module.out_channels // module.groups)
            return k * per * math.prod(shapes[0][2:])
        per = module.out_channels * (module.in_channels // module.groups)
        return k * per * math.prod(shapes[1][2:])
    in_hw = (int(shapes[0][-2]), int(shapes[0][-1]))
    if isinstance(module, nn.Conv2d):
        out_hw = conv_out_hw(module, in_hw)
        k = math.prod(module.kernel_size) * (module.in_channels // module.groups)
        return 2 * module.out_channels * k * out_hw[0] * out_hw[1]
    if kind == "hw":
        return int(module.flops(in_hw))  # type: ignore[operator]
    return None
