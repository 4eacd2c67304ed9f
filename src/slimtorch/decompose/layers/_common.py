"""Shared pieces of the factorised layers: argument normalisation, FLOP counts, layer kinds."""

from __future__ import annotations

import math
from typing import Any, Self

import torch
from torch import nn

from slimtorch.core.registry import Registry

IntPair = int | tuple[int, ...]  # an int or a pair, as nn.Conv2d takes them
Padding = int | tuple[int, ...] | str  # also "same" / "valid"

# kind -> factorised layer class (each has ``from_spec(spec, device=..., dtype=...)``).
LAYER_KINDS: Registry[type[nn.Module]] = Registry("factorised layer kind")


def pair(value: int | tuple[int, ...] | list[int], name: str) -> tuple[int, int]:
    """``3 -> (3, 3)``; ``(1, 2) -> (1, 2)``; anything else raises ``ValueError``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if (
        isinstance(value, tuple | list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")


def padding_arg(value: Any) -> tuple[int, int] | str:
    """Normalise a conv padding: a pair of ints, or ``"same"``/``"valid"``."""
    if isinstance(value, str):
        if value not in ("same", "valid"):
            raise ValueError(f"padding must be an int, a pair or 'same'/'valid', got {value!r}")
        return value
    return pair(value, "padding")


def conv_out_hw(conv: nn.Conv2d, in_hw: tuple[int, int]) -> tuple[int, int]:
    """Output spatial size of ``conv`` for an input of spatial size ``in_hw``."""
    if isinstance(conv.padding, str):
        if conv.padding == "same":
            return in_hw
        pad = (0, 0)
    else:
        pad = (int(conv.padding[0]), int(conv.padding[1]))
    out = []
    for i in range(2):
        k = conv.dilation[i] * (conv.kernel_size[i] - 1) + 1
        out.append((in_hw[i] + 2 * pad[i] - k) // conv.stride[i] + 1)
    return (out[0], out[1])


def conv_flops(conv: nn.Conv2d, in_hw: tuple[int, int]) -> tuple[int, tuple[int, int]]:
    """``(FLOPs, out_hw)`` of one sample through ``conv``: 2 x multiply-adds, bias ignored."""
    out_hw = conv_out_hw(conv, in_hw)
    macs_per_pixel = (
        conv.out_channels * (conv.in_channels // conv.groups) * math.prod(conv.kernel_size)
    )
    return 2 * macs_per_pixel * out_hw[0] * out_hw[1], out_hw


def chain_conv_flops(convs: list[nn.Conv2d], in_hw: tuple[int, int]) -> int:
    """Summed FLOPs of convs applied one after the other from spatial size ``in_hw``."""
    total, hw = 0, in_hw
    for conv in convs:
        flops, hw = conv_flops(conv, hw)
        total += flops
    return total


def factory(device: torch.device | str | None, dtype: torch.dtype | None) -> dict[str, Any]:
    """``device``/``dtype`` keyword arguments for layer constructors."""
    return {"device": device, "dtype": dtype}


def spec_args(spec: dict[str, Any]) -> dict[str, Any]:
    """Constructor keyword arguments from a layer spec: drop ``kind``, lists become tuples."""
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in spec.items() if k != "kind"}


class FromSpec:
    """Mixin of the factorised layers: rebuild a layer (random init) from its ``spec()`` dict.

    ``spec()`` records the constructor arguments plus a ``kind`` key naming the layer class.

    Example:
        >>> from slimtorch.decompose import LowRankLinear
        >>> layer = LowRankLinear(64, 32, 8)
        >>> type(LowRankLinear.from_spec(layer.spec())) is LowRankLinear
        True
    """

    @classmethod
    def from_spec(
        cls,
        spec: dict[str, Any],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Self:
        """Build a randomly initialised layer from :meth:`spec`'s output."""
        return cls(**spec_args(spec), device=device, dtype=dtype)  # type: ignore[call-arg]
