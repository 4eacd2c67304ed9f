"""Shared piece of the fused Tucker layer tests: the library-convolution reference of a layer."""

from __future__ import annotations

import torch

from slimtorch.decompose import FusedTuckerConv2d
from slimtorch.decompose.fused_op import reference


def reference_of(
    layer: FusedTuckerConv2d, x: torch.Tensor, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """The fused layer's maths as library convolutions (the module-level original of
    ``fused_op.reference``, whatever a test monkeypatches), with ``layer``'s weights."""
    return reference(
        x,
        layer.first.weight.flatten(1),
        layer.core.weight,
        layer.last.weight.flatten(1),
        layer.last.bias,
        residual,
        layer.core.stride,
        layer.core.padding,
        layer.core.dilation,
        layer.relu,
    )
