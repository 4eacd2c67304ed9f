"""``LowRankLinear`` and ``LowRankConv2d`` (1x1): two dense layers from a truncated SVD.

Denton et al., 2014, "Exploiting linear structure within convolutional networks for efficient
evaluation", arXiv:1404.0736.

Example:
    >>> layer = LowRankLinear.from_layer(nn.Linear(64, 32), rank=8)
    >>> layer(torch.randn(4, 64)).shape
    torch.Size([4, 32])
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
from slimtorch.decompose.layers.tucker_conv import check_plain_conv
from slimtorch.decompose.linalg import check_rank
from slimtorch.decompose.svd import truncated_svd


def _check_factors(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(
            f"factors must be a (out, r) and b (r, in), got {tuple(a.shape)} and {tuple(b.shape)}"
        )


class LowRankLinear(FromSpec, nn.Module):
    """``Linear(in -> r, no bias)`` then ``Linear(r -> out)`` with the original bias.

    Example:
        >>> LowRankLinear(16, 8, rank=4)(torch.randn(2, 16)).shape
        torch.Size([2, 8])
    """

    kind = "svd_linear"
    flops_input = "rows"  # flops() takes the input row count

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_rank(rank, "LowRankLinear rank")
        self.first = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.last = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.first(x))

    @property
    def rank(self) -> int:
        """``r``."""
        return self.first.out_features

    def spec(self) -> dict[str, Any]:
        """Constructor arguments (JSON-ready) with ``kind``."""
        return {
            "kind": self.kind,
            "in_features": self.first.in_features,
            "out_features": self.last.out_features,
            "rank": self.rank,
            "bias": self.last.bias is not None,
        }

    def flops(self, rows: int = 1) -> int:
        """FLOPs (2 x MACs) for ``rows`` input rows."""
        return 2 * rows * self.rank * (self.first.in_features + self.last.out_features)

    @classmethod
    def from_factors(
        cls, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None
    ) -> LowRankLinear:
        """Build from ``W ~= a @ b`` with ``a (out, r)`` and ``b (r, in)``.

        Example:
            >>> LowRankLinear.from_factors(torch.randn(8, 2), torch.randn(2, 5)).rank
            2
        """
        _check_factors(a, b)
        layer = cls(
            b.shape[1],
            a.shape[0],
            a.shape[1],
            bias=bias is not None,
            device=a.device,
            dtype=a.dtype,
        )
        with torch.no_grad():
            layer.first.weight.copy_(b)  # (r, in)
            layer.last.weight.copy_(a)  # (out, r)
            if bias is not None and layer.last.bias is not None:
                layer.last.bias.copy_(bias)
        return layer

    @classmethod
    def from_layer(cls, linear: nn.Linear, rank: int) -> LowRankLinear:
        """Factorise ``linear.weight`` by :func:`~slimtorch.decompose.svd.truncated_svd`.

        Example:
            >>> LowRankLinear.from_layer(nn.Linear(10, 6), 3).rank
            3
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LowRankLinear needs an nn.Linear, got {type(linear).__name__}")
        a, b = truncated_svd(linear.weight.detach(), rank)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls.from_factors(a, b, bias)


class LowRankConv2d(FromSpec, nn.Module):
    """A 1x1 conv as ``Conv2d(C_in -> r, 1x1)`` (original stride and padding) then
    ``Conv2d(r -> C_out, 1x1)`` with the original bias.

    Example:
        >>> LowRankConv2d(16, 8, rank=4, stride=2)(torch.randn(1, 16, 6, 6)).shape
        torch.Size([1, 8, 3, 3])
    """

    kind = "svd_conv1x1"
    flops_input = "hw"  # flops() takes the input spatial size

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        rank: int,
        *,
        stride: IntPair = 1,
        padding: Padding = 0,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_rank(rank, "LowRankConv2d rank")
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.first = nn.Conv2d(
            in_channels,
            rank,
            1,
            stride=pair(stride, "stride"),
            padding=padding_arg(padding),
            bias=False,
            **kw,
        )
        self.last = nn.Conv2d(rank, out_channels, 1, bias=bias, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.first(x))

    @property
    def rank(self) -> int:
        """``r``."""
        return self.first.out_channels

    def spec(self) -> dict[str, Any]:
        """Constructor arguments (JSON-ready) with ``kind``."""
        pad = self.first.padding
        return {
            "kind": self.kind,
            "in_channels": self.first.in_channels,
            "out_channels": self.last.out_channels,
            "rank": self.rank,
            "stride": list(self.first.stride),
            "padding": pad if isinstance(pad, str) else list(pad),
            "bias": self.last.bias is not None,
        }

    def flops(self, in_hw: tuple[int, int]) -> int:
        """FLOPs (2 x MACs) of one sample of spatial size ``in_hw``."""
        return chain_conv_flops([self.first, self.last], in_hw)

    @classmethod
    def from_factors(
        cls,
        a: torch.Tensor,
        b: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        stride: IntPair = 1,
        padding: Padding = 0,
    ) -> LowRankConv2d:
        """Build from ``W[:, :, 0, 0] ~= a @ b`` with ``a (C_out, r)`` and ``b (r, C_in)``.

        Example:
            >>> LowRankConv2d.from_factors(torch.randn(8, 2), torch.randn(2, 5)).rank
            2
        """
        _check_factors(a, b)
        layer = cls(
            b.shape[1],
            a.shape[0],
            a.shape[1],
            stride=stride,
            padding=padding,
            bias=bias is not None,
            device=a.device,
            dtype=a.dtype,
        )
        with torch.no_grad():
            layer.first.weight.copy_(b[:, :, None, None])  # (r, C_in, 1, 1)
            layer.last.weight.copy_(a[:, :, None, None])  # (C_out, r, 1, 1)
            if bias is not None and layer.last.bias is not None:
                layer.last.bias.copy_(bias)
        return layer

    @classmethod
    def from_layer(cls, conv: nn.Conv2d, rank: int) -> LowRankConv2d:
        """Factorise a dense, zero-padded 1x1 ``conv`` by truncated SVD.

        Raises:
            TypeError, ValueError: not a dense 1x1 ``nn.Conv2d`` with zero padding; bad rank.

        Example:
            >>> LowRankConv2d.from_layer(nn.Conv2d(8, 8, 1), 2).rank
            2
        """
        check_plain_conv(conv, "LowRankConv2d")
        if tuple(conv.kernel_size) != (1, 1):
            raise ValueError(
                f"LowRankConv2d needs a 1x1 conv, got kernel {tuple(conv.kernel_size)}; use "
                "TuckerConv2d or CPConv2d for spatial kernels"
            )
        weight = conv.weight.detach()[:, :, 0, 0]  # (C_out, C_in)
        a, b = truncated_svd(weight, rank)
        bias = None if conv.bias is None else conv.bias.detach()
        return cls.from_factors(a, b, bias, stride=conv.stride, padding=conv.padding)


LAYER_KINDS.add(LowRankLinear.kind, LowRankLinear)
LAYER_KINDS.add(LowRankConv2d.kind, LowRankConv2d)
