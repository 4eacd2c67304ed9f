"""``TuckerConv2d``: a conv as 1x1 -> kxk core -> 1x1, from a Tucker-2 decomposition.

Kim et al., 2016, "Compression of deep convolutional neural networks for fast and low power mobile
applications", arXiv:1511.06530.

Example:
    >>> conv = nn.Conv2d(16, 32, 3, padding=1)
    >>> layer = TuckerConv2d.from_layer(conv, ranks=(8, 4))
    >>> layer(torch.randn(1, 16, 8, 8)).shape
    torch.Size([1, 32, 8, 8])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimtorch.decompose.layers._common import (
    LAYER_KINDS,
    FromSpec,
    IntPair,
    Padding,
    chain_conv_flops,
    padding_arg,
    pair,
)
from slimtorch.decompose.linalg import check_rank
from slimtorch.decompose.tucker import tucker2


def check_plain_conv(conv: nn.Module, method: str, *, spatial: bool = False) -> nn.Conv2d:
    """Raise ``TypeError``/``ValueError`` unless ``conv`` is a dense, zero-padded ``nn.Conv2d``."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"{method} needs an nn.Conv2d, got {type(conv).__name__}")
    if conv.groups != 1:
        raise ValueError(
            f"{method} needs a dense conv (groups=1), got groups={conv.groups}; grouped and "
            "depthwise convs are already factorised, so exclude them"
        )
    if conv.padding_mode != "zeros":
        raise ValueError(
            f"{method} supports padding_mode='zeros' only, got {conv.padding_mode!r}; exclude "
            "this layer"
        )
    if spatial and tuple(conv.kernel_size) == (1, 1):
        raise ValueError(
            f"{method} needs a spatial kernel, got 1x1 (no spatial factors); use SVDConfig "
            "(LowRankConv2d) for 1x1 convs"
        )
    return conv


class TuckerConv2d(FromSpec, nn.Module):
    """1x1 conv ``C_in -> r_in``, ``kh x kw`` core conv ``r_in -> r_out`` (original stride,
    padding and dilation), 1x1 conv ``r_out -> C_out`` with the original bias.

    Args:
        in_channels: ``C_in``.
        out_channels: ``C_out``.
        kernel_size: ``k`` or ``(kh, kw)``.
        ranks: ``(r_out, r_in)``.
        stride, padding, dilation: As in ``nn.Conv2d`` (applied by the core conv).
        bias: Whether the last conv has a bias.
        device, dtype: Where and in what to create the weights.

    Example:
        >>> TuckerConv2d(8, 16, 3, ranks=(4, 2), padding=1)(torch.randn(2, 8, 5, 5)).shape
        torch.Size([2, 16, 5, 5])
    """

    kind = "tucker"
    flops_input = "hw"  # flops() takes the input spatial size

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        ranks: tuple[int, int],
        *,
        stride: IntPair = 1,
        padding: Padding = 0,
        dilation: IntPair = 1,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        r_out, r_in = pair(tuple(ranks), "ranks")
        check_rank(r_out, "TuckerConv2d ranks[0] (r_out)")
        check_rank(r_in, "TuckerConv2d ranks[1] (r_in)")
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.first = nn.Conv2d(in_channels, r_in, 1, bias=False, **kw)
        self.core = nn.Conv2d(
            r_in,
            r_out,
            pair(kernel_size, "kernel_size"),
            stride=pair(stride, "stride"),
            padding=padding_arg(padding),
            dilation=pair(dilation, "dilation"),
            bias=False,
            **kw,
        )
        self.last = nn.Conv2d(r_out, out_channels, 1, bias=bias, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.core(self.first(x)))

    @property
    def ranks(self) -> tuple[int, int]:
        """``(r_out, r_in)``."""
        return (self.core.out_channels, self.core.in_channels)

    def spec(self) -> dict[str, Any]:
        """Constructor arguments (JSON-ready) with ``kind``, to rebuild the layer's shapes."""
        padding = self.core.padding
        return {
            "kind": self.kind,
            "in_channels": self.first.in_channels,
            "out_channels": self.last.out_channels,
            "kernel_size": list(self.core.kernel_size),
            "ranks": list(self.ranks),
            "stride": list(self.core.stride),
            "padding": padding if isinstance(padding, str) else list(padding),
            "dilation": list(self.core.dilation),
            "bias": self.last.bias is not None,
        }

    def flops(self, in_hw: tuple[int, int]) -> int:
        """FLOPs (2 x MACs) of one sample of spatial size ``in_hw``."""
        return chain_conv_flops([self.first, self.core, self.last], in_hw)

    @classmethod
    def from_factors(
        cls,
        core: torch.Tensor,
        u_out: torch.Tensor,
        u_in: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        stride: IntPair = 1,
        padding: Padding = 0,
        dilation: IntPair = 1,
    ) -> TuckerConv2d:
        """Build from Tucker-2 factors ``core (r_out, r_in, kh, kw)``, ``u_out (C_out, r_out)``,
        ``u_in (C_in, r_in)``; the layer takes their device and dtype.

        Example:
            >>> core, u_out, u_in = tucker2(torch.randn(8, 4, 3, 3), (2, 2))
            >>> TuckerConv2d.from_factors(core, u_out, u_in).ranks
            (2, 2)
        """
        if core.ndim != 4 or u_out.shape[1] != core.shape[0] or u_in.shape[1] != core.shape[1]:
            raise ValueError(
                f"factor shapes do not fit: core {tuple(core.shape)} must be (r_out, r_in, kh, kw)"
                f", u_out {tuple(u_out.shape)} (C_out, r_out), u_in {tuple(u_in.shape)} "
                "(C_in, r_in)"
            )
        layer = cls(
            u_in.shape[0],
            u_out.shape[0],
            (core.shape[2], core.shape[3]),
            (core.shape[0], core.shape[1]),
            stride=stride,
            padding=padding,
            dilation=dilation,
            bias=bias is not None,
            device=core.device,
            dtype=core.dtype,
        )
        with torch.no_grad():
            layer.first.weight.copy_(u_in.mT[:, :, None, None])  # (r_in, C_in, 1, 1)
            layer.core.weight.copy_(core)  # (r_out, r_in, kh, kw)
            layer.last.weight.copy_(u_out[:, :, None, None])  # (C_out, r_out, 1, 1)
            if bias is not None and layer.last.bias is not None:
                layer.last.bias.copy_(bias)
        return layer

    @classmethod
    def from_layer(
        cls, conv: nn.Conv2d, ranks: tuple[int, int], *, n_iter: int = 25, tol: float = 1e-7
    ) -> TuckerConv2d:
        """Decompose ``conv``'s kernel with :func:`~slimtorch.decompose.tucker.tucker2`.

        Raises:
            TypeError, ValueError: not a dense, zero-padded ``nn.Conv2d``; bad ranks.

        Example:
            >>> TuckerConv2d.from_layer(nn.Conv2d(8, 8, 3), ranks=(4, 4)).ranks
            (4, 4)
        """
        check_plain_conv(conv, "TuckerConv2d")
        weight = conv.weight.detach()
        core, u_out, u_in = tucker2(weight, (ranks[0], ranks[1]), n_iter=n_iter, tol=tol)
        bias = None if conv.bias is None else conv.bias.detach()
        return cls.from_factors(
            core,
            u_out,
            u_in,
            bias,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
        )


LAYER_KINDS.add(TuckerConv2d.kind, TuckerConv2d)
