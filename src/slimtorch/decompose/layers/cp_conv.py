"""``CPConv2d``: a conv as 1x1 -> kx1 depthwise -> 1xk depthwise -> 1x1, from a CP decomposition.

Lebedev et al., 2015, "Speeding-up convolutional neural networks using fine-tuned
CP-decomposition", arXiv:1412.6553.

Example:
    >>> conv = nn.Conv2d(8, 16, 3, padding=1)
    >>> layer = CPConv2d.from_layer(conv, rank=8, require_convergence=False)
    >>> layer(torch.randn(1, 8, 6, 6)).shape
    torch.Size([1, 16, 6, 6])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimtorch.decompose.cp import CPResult, cp_als
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


class CPConv2d(FromSpec, nn.Module):
    """1x1 conv ``C_in -> R``, ``kh x 1`` depthwise conv (``groups=R``), ``1 x kw`` depthwise
    conv, 1x1 conv ``R -> C_out`` with the original bias.

    The vertical conv takes the height part of stride, padding and dilation, the horizontal conv
    the width part, so the composition covers exactly the original receptive field.

    Args:
        in_channels, out_channels: ``C_in``, ``C_out``.
        kernel_size: ``k`` or ``(kh, kw)``.
        rank: ``R``.
        stride, padding, dilation: As in ``nn.Conv2d``.
        bias: Whether the last conv has a bias.
        device, dtype: Where and in what to create the weights.

    Example:
        >>> CPConv2d(4, 6, 3, rank=5, stride=2, padding=1)(torch.randn(1, 4, 8, 8)).shape
        torch.Size([1, 6, 4, 4])
    """

    kind = "cp"
    flops_input = "hw"  # flops() takes the input spatial size

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        rank: int,
        *,
        stride: IntPair = 1,
        padding: Padding = 0,
        dilation: IntPair = 1,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_rank(rank, "CPConv2d rank")
        kh, kw = pair(kernel_size, "kernel_size")
        sh, sw = pair(stride, "stride")
        dh, dw = pair(dilation, "dilation")
        pad = padding_arg(padding)
        pad_v: tuple[int, int] | str = pad if isinstance(pad, str) else (pad[0], 0)
        pad_h: tuple[int, int] | str = pad if isinstance(pad, str) else (0, pad[1])
        kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
        self.first = nn.Conv2d(in_channels, rank, 1, bias=False, **kwargs)
        self.vertical = nn.Conv2d(
            rank,
            rank,
            (kh, 1),
            stride=(sh, 1),
            padding=pad_v,
            dilation=(dh, 1),
            groups=rank,
            bias=False,
            **kwargs,
        )
        self.horizontal = nn.Conv2d(
            rank,
            rank,
            (1, kw),
            stride=(1, sw),
            padding=pad_h,
            dilation=(1, dw),
            groups=rank,
            bias=False,
            **kwargs,
        )
        self.last = nn.Conv2d(rank, out_channels, 1, bias=bias, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.horizontal(self.vertical(self.first(x))))

    @property
    def rank(self) -> int:
        """``R``."""
        return self.first.out_channels

    def spec(self) -> dict[str, Any]:
        """Constructor arguments (JSON-ready) with ``kind``, to rebuild the layer's shapes."""
        v, h = self.vertical, self.horizontal
        padding: Any = v.padding if isinstance(v.padding, str) else [v.padding[0], h.padding[1]]
        return {
            "kind": self.kind,
            "in_channels": self.first.in_channels,
            "out_channels": self.last.out_channels,
            "kernel_size": [v.kernel_size[0], h.kernel_size[1]],
            "rank": self.rank,
            "stride": [v.stride[0], h.stride[1]],
            "padding": padding,
            "dilation": [v.dilation[0], h.dilation[1]],
            "bias": self.last.bias is not None,
        }

    def flops(self, in_hw: tuple[int, int]) -> int:
        """FLOPs (2 x MACs) of one sample of spatial size ``in_hw``."""
        return chain_conv_flops([self.first, self.vertical, self.horizontal, self.last], in_hw)

    @classmethod
    def from_factors(
        cls,
        weights: torch.Tensor,
        factors: list[torch.Tensor],
        bias: torch.Tensor | None = None,
        *,
        stride: IntPair = 1,
        padding: Padding = 0,
        dilation: IntPair = 1,
    ) -> CPConv2d:
        """Build from CP ``weights (R,)`` and factors ``[A_out (C_out, R), A_in (C_in, R),
        A_h (kh, R), A_w (kw, R)]`` of a ``(C_out, C_in, kh, kw)`` kernel.

        Example:
            >>> fs = [torch.randn(n, 3) for n in (6, 4, 3, 3)]
            >>> CPConv2d.from_factors(torch.ones(3), fs).rank
            3
        """
        if len(factors) != 4 or weights.ndim != 1:
            raise ValueError(
                f"need weights (R,) and 4 factors (C_out, C_in, kh, kw modes), got weights "
                f"{tuple(weights.shape)} and {len(factors)} factors"
            )
        a_out, a_in, a_h, a_w = factors
        rank = weights.shape[0]
        if any(f.ndim != 2 or f.shape[1] != rank for f in factors):
            raise ValueError(
                f"every factor must be (I_n, R={rank}), got {[tuple(f.shape) for f in factors]}"
            )
        layer = cls(
            a_in.shape[0],
            a_out.shape[0],
            (a_h.shape[0], a_w.shape[0]),
            rank,
            stride=stride,
            padding=padding,
            dilation=dilation,
            bias=bias is not None,
            device=weights.device,
            dtype=weights.dtype,
        )
        with torch.no_grad():
            layer.first.weight.copy_(a_in.mT[:, :, None, None])  # (R, C_in, 1, 1)
            layer.vertical.weight.copy_(a_h.mT[:, None, :, None])  # (R, 1, kh, 1)
            layer.horizontal.weight.copy_(a_w.mT[:, None, None, :])  # (R, 1, 1, kw)
            layer.last.weight.copy_((a_out * weights)[:, :, None, None])  # (C_out, R, 1, 1)
            if bias is not None and layer.last.bias is not None:
                layer.last.bias.copy_(bias)
        return layer

    @classmethod
    def from_result(cls, result: CPResult, conv: nn.Conv2d) -> CPConv2d:
        """Build from a :func:`~slimtorch.decompose.cp.cp_als` result of ``conv.weight``."""
        bias = None if conv.bias is None else conv.bias.detach()
        return cls.from_factors(
            result.weights,
            result.factors,
            bias,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
        )

    @classmethod
    def from_layer(
        cls,
        conv: nn.Conv2d,
        rank: int,
        *,
        n_iter: int = 500,
        tol: float = 1e-6,
        reg: float = 1e-3,
        init: str = "svd",
        require_convergence: bool = True,
    ) -> CPConv2d:
        """Decompose ``conv``'s kernel with :func:`~slimtorch.decompose.cp.cp_als`.

        Raises:
            TypeError, ValueError: not a dense, zero-padded, spatial ``nn.Conv2d``; bad rank.
            DecompositionError: the ALS run failed (see :func:`cp_als`).

        Example:
            >>> CPConv2d.from_layer(nn.Conv2d(4, 4, 3), 4, require_convergence=False).rank
            4
        """
        check_plain_conv(conv, "CPConv2d", spatial=True)
        result = cp_als(
            conv.weight.detach(),
            rank,
            n_iter=n_iter,
            tol=tol,
            reg=reg,
            init=init,
            require_convergence=require_convergence,
        )
        return cls.from_result(result, conv)


LAYER_KINDS.add(CPConv2d.kind, CPConv2d)
