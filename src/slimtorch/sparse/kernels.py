"""Sparse-kernel layers: linear and conv layers whose weight is a CSR, BSR or 2:4 sparse tensor.

- CSR/BSR: ``y^T = bias + W @ x^T`` with ``torch.addmm`` on a ``torch.sparse_csr``/``_bsr``
  weight (MKL/native kernels on the CPU, cuSPARSE on CUDA).
- 2:4 (``"semi_structured"``): ``F.linear`` on a weight converted by
  ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt/CUTLASS kernels, NVIDIA GPUs of compute
  capability >= 8.0 only; elsewhere 2:4 is a storage format, see :func:`semi_structured_support`).

Convolutions are lowered to one sparse matrix product by im2col (Chellapilla et al. 2006, "High
Performance Convolutional Neural Networks for Document Processing"): ``F.unfold`` turns the input
into ``(N, C*kh*kw, L)`` patches, the ``(C_out, C*kh*kw)`` sparse weight multiplies them, and the
result is folded back to ``(N, C_out, H_out, W_out)``. The lowering copies the input
``kh*kw`` times, so it only pays for very sparse, large convolutions; :func:`~slimtorch.sparse.
sparsify_` keeps it only where a measurement says so. For 2:4, whose groups run along input
channels, the patch rows and weight columns are put in ``(kh, kw, C)`` order so that each group
of 4 consecutive columns is 4 channels at one kernel position.

These modules are for inference: their weight is a non-persistent buffer (not in the state
dict) and has no gradient. Build them with :func:`build_sparse_layer`; undo with
:meth:`SparseLinear.to_dense_module`.

Example:
    >>> lin = nn.Linear(64, 32)
    >>> _ = lin.weight.data.masked_fill_(torch.rand(32, 64) < 0.9, 0.0)
    >>> sparse = build_sparse_layer(lin, "csr")
    >>> x = torch.randn(4, 64)
    >>> torch.allclose(sparse(x), lin(x), atol=1e-5)
    True
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

KERNEL_FORMATS = ("csr", "bsr", "semi_structured")


def semi_structured_support(device: torch.device | str) -> str | None:
    """``None`` when 2:4 semi-structured kernels run on ``device``, else why not.

    Example:
        >>> semi_structured_support("cpu")[:28]
        '2:4 is storage-only on cpu: '
    """
    device = torch.device(device)
    need = "PyTorch's semi-structured sparse kernels need an NVIDIA CUDA GPU of compute capability"
    if device.type != "cuda":
        return f"2:4 is storage-only on {device}: {need} >= 8.0"
    if torch.version.hip is not None:
        return f"2:4 is storage-only on this ROCm build: {need} >= 8.0"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        cap = f"compute capability {major}.{minor}"
        return f"2:4 is storage-only on {device} ({cap}): {need} >= 8.0"
    return None


def _bsr_block(rows: int, cols: int) -> tuple[int, int] | None:
    for b in (32, 16, 8, 4):
        if rows % b == 0 and cols % b == 0:
            return (b, b)
    return None


def _to_sparse(weight2d: torch.Tensor, fmt: str, block: tuple[int, int] | None) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR/BSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        if fmt == "csr":
            return weight2d.to_sparse_csr()
        if fmt == "bsr":
            blk = block or _bsr_block(*weight2d.shape)
            if blk is None:
                raise ValueError(
                    f"no BSR block size of 32, 16, 8, 4 divides a weight of shape "
                    f"{tuple(weight2d.shape)}; use csr for this layer"
                )
            return weight2d.to_sparse_bsr(blk)
        if fmt == "semi_structured":
            from torch.sparse import to_sparse_semi_structured

            return to_sparse_semi_structured(weight2d)
    raise ValueError(f"fmt must be one of {', '.join(KERNEL_FORMATS)}, got {fmt!r}")


def _carry_masks(src: nn.Module, dst: nn.Module, *, persistent: bool) -> None:
    """Give ``dst`` the pruning masks (``weight_mask``/``bias_mask`` buffers) of ``src``."""
    for name in ("weight_mask", "bias_mask"):
        mask = src._buffers.get(name)
        if isinstance(mask, torch.Tensor):
            dst.register_buffer(name, mask, persistent=persistent)


def _csr_bsr_matmul(weight: torch.Tensor, xt: torch.Tensor, bias: Any) -> torch.Tensor:
    """``weight (O, K) @ xt (K, M) + bias`` -> ``(O, M)`` with a CSR/BSR ``weight``."""
    if bias is None:
        return torch.sparse.mm(weight, xt)
    return torch.addmm(bias.unsqueeze(1), weight, xt)


class SparseLinear(nn.Module):
    weight: torch.Tensor

    """``nn.Linear`` with a CSR, BSR or 2:4 sparse weight (inference only).

    Args:
        weight: The dense ``(out, in)`` weight (zeros are dropped).
        bias: The bias or ``None``.
        fmt: ``"csr"``, ``"bsr"`` or ``"semi_structured"``.
        block: BSR block size (``None``: the largest of 32, 16, 8, 4 that divides the shape).

    Example:
        >>> layer = SparseLinear(torch.eye(8), None, "csr")
        >>> layer(torch.ones(2, 8)).shape
        torch.Size([2, 8])
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        fmt: str,
        *,
        block: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.fmt = fmt
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        self.register_buffer("weight", _to_sparse(weight.detach(), fmt, block), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)  # (M, in)
        if self.fmt == "semi_structured":
            out = F.linear(x2d, self.weight, self.bias)
        else:
            out = _csr_bsr_matmul(self.weight, x2d.t(), self.bias).t().contiguous()  # (M, out)
        return out.view(*lead, self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense ``(out, in)`` tensor."""
        return self.weight.to_dense()

    def to_dense_module(self) -> nn.Linear:
        """An ``nn.Linear`` with the same weights (and the pruning masks it was built with)."""
        w = self.dense_weight()
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None)
        lin = lin.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        _carry_masks(self, lin, persistent=True)
        _carry_state(self, lin)
        return lin

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"


def conv_lowering_skip(conv: nn.Conv2d) -> str | None:
    """Why ``conv`` cannot be lowered to one sparse matrix product (``None`` if it can).

    Example:
        >>> conv_lowering_skip(nn.Conv2d(8, 8, 3, groups=8))
        'grouped/depthwise conv (groups=8): no sparse kernel for it here; it stays dense'
    """
    if conv.groups != 1:
        return (
            f"grouped/depthwise conv (groups={conv.groups}): no sparse kernel for it here; "
            "it stays dense"
        )
    if conv.padding_mode != "zeros":
        return f"padding_mode {conv.padding_mode!r}: the im2col lowering pads with zeros only"
    if isinstance(conv.padding, str) and conv.padding != "valid":
        return f"padding={conv.padding!r}: the im2col lowering needs explicit integer padding"
    return None


class SparseConv2d(nn.Module):
    weight: torch.Tensor

    """``nn.Conv2d`` (``groups=1``) lowered by im2col to one sparse matrix product.

    Example:
        >>> conv = nn.Conv2d(4, 8, 3, padding=1)
        >>> sparse = SparseConv2d.from_conv(conv, "csr")
        >>> x = torch.randn(2, 4, 6, 6)
        >>> torch.allclose(sparse(x), conv(x), atol=1e-5)
        True
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        fmt: str,
        *,
        stride: tuple[int, ...],
        padding: tuple[int, ...],
        dilation: tuple[int, ...],
        block: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.fmt = fmt
        self.out_channels, self.in_channels, kh, kw = (int(s) for s in weight.shape)
        self.kernel_size = (kh, kw)
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self.channels_inner = fmt == "semi_structured"  # columns in (kh, kw, C) order
        w = weight.detach()
        w2d = w.permute(0, 2, 3, 1) if self.channels_inner else w  # (O, kh, kw, C) or (O, C, ..)
        w2d = w2d.reshape(self.out_channels, -1).contiguous()  # (O, K)
        self.register_buffer("weight", _to_sparse(w2d, fmt, block), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), False)

    @classmethod
    def from_conv(
        cls, conv: nn.Conv2d, fmt: str, *, block: tuple[int, int] | None = None
    ) -> SparseConv2d:
        """Build from an ``nn.Conv2d``; raises ``ValueError`` if it cannot be lowered."""
        reason = conv_lowering_skip(conv)
        if reason is not None:
            raise ValueError(reason)
        padding = (0, 0) if conv.padding == "valid" else tuple(conv.padding)
        return cls(
            conv.weight,
            conv.bias,
            fmt,
            stride=tuple(conv.stride),
            padding=padding,  # type: ignore[arg-type]
            dilation=tuple(conv.dilation),
            block=block,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # one unbatched (C, H, W) image, as nn.Conv2d takes it
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"SparseConv2d expects (N, {self.in_channels}, H, W) or ({self.in_channels}, H, "
                f"W) input, got shape {tuple(x.shape)}"
            )
        n, _, h, w = x.shape
        kh, kw = self.kernel_size
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (N,K,L)
        h_out = (h + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        w_out = (w + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        if self.channels_inner:  # (N, C, kh*kw, L) -> (N, kh*kw, C, L)
            cols = cols.view(n, self.in_channels, kh * kw, -1).transpose(1, 2)
        cols = cols.reshape(n, -1, h_out * w_out)  # (N, K, L)
        if self.fmt == "semi_structured":
            rows = cols.transpose(1, 2).reshape(n * h_out * w_out, -1)  # (N*L, K)
            out = F.linear(rows, self.weight, self.bias)  # (N*L, O)
            out = out.view(n, h_out, w_out, self.out_channels).permute(0, 3, 1, 2)
        else:
            xt = cols.transpose(0, 1).reshape(cols.shape[1], -1)  # (K, N*L)
            out = _csr_bsr_matmul(self.weight, xt, self.bias)  # (O, N*L)
            out = out.view(self.out_channels, n, h_out, w_out).transpose(0, 1)
        return out.contiguous()

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense ``(C_out, C_in, kh, kw)`` tensor."""
        w2d = self.weight.to_dense()
        kh, kw = self.kernel_size
        if self.channels_inner:
            return w2d.view(self.out_channels, kh, kw, self.in_channels).permute(0, 3, 1, 2)
        return w2d.view(self.out_channels, self.in_channels, kh, kw)

    def to_dense_module(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` with the same weights (and the pruning masks it was built with)."""
        w = self.dense_weight()
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,  # type: ignore[arg-type]
            padding=self.padding,  # type: ignore[arg-type]
            dilation=self.dilation,  # type: ignore[arg-type]
            bias=self.bias is not None,
        ).to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            conv.weight.copy_(w)
            if self.bias is not None and conv.bias is not None:
                conv.bias.copy_(self.bias)
        _carry_masks(self, conv, persistent=True)
        _carry_state(self, conv)
        return conv

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, fmt={self.fmt}"
        )


def build_sparse_layer(
    module: nn.Module, fmt: str, *, block: tuple[int, int] | None = None
) -> SparseLinear | SparseConv2d:
    """The sparse-kernel twin of an ``nn.Linear`` or ``nn.Conv2d`` (same device and dtype).

    Pruning masks of ``module`` ride along (outside the state dict, like the sparse weight),
    so ``to_dense_module`` and :func:`~slimtorch.sparse.densify_` give them back.

    Raises:
        TypeError: ``module`` is neither.
        ValueError: the format does not apply (no BSR block divides it, conv not lowerable).
        RuntimeError: the backend rejects it (e.g. 2:4 shape or dtype limits of the kernels).

    Example:
        >>> type(build_sparse_layer(nn.Conv2d(4, 8, 1), "bsr")).__name__
        'SparseConv2d'
    """
    if fmt not in KERNEL_FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(KERNEL_FORMATS)}, got {fmt!r}")
    layer: SparseLinear | SparseConv2d
    if isinstance(module, nn.Linear):
        layer = SparseLinear(module.weight, module.bias, fmt, block=block)
    elif isinstance(module, nn.Conv2d):
        layer = SparseConv2d.from_conv(module, fmt, block=block)
    else:
        raise TypeError(f"expected nn.Linear or nn.Conv2d, got {type(module).__name__}")
    _carry_masks(module, layer, persistent=False)
    _carry_state(module, layer)
    return layer


def _carry_state(old: nn.Module, new: nn.Module) -> None:
    """What a swap must keep besides the weights: ``cast_``'s boundary casts (a half layer
    without its input cast fails on float32 inputs), the training mode and which parameters
    were frozen (kept on the sparse layer to give back to its dense form)."""
    from slimtorch.quant.precision import carry_precision_

    carry_precision_(old, new)
    new.train(old.training)
    if isinstance(new, SparseLinear | SparseConv2d):  # inference only: its own flags stay
        frozen = [n for n, p in old.named_parameters(recurse=False) if not p.requires_grad]
        new.slimtorch_frozen = frozen  # type: ignore[assignment]
        return
    for name in getattr(old, "slimtorch_frozen", []):  # a dense form: as before the swap
        param = getattr(new, name, None)
        if isinstance(param, nn.Parameter):
            param.requires_grad_(False)
