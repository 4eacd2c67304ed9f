"""Quantization arithmetic shared by PTQ, QAT and mixed precision: ranges, fake quantization,
per-channel symmetric weight quantization.

Example:
    >>> weight_range(4)
    (-8, 7)
"""

from __future__ import annotations

import torch


def weight_range(bits: int) -> tuple[int, int]:
    """``(qmin, qmax)`` of symmetric signed weights of ``bits`` bits (8 or 4).

    Example:
        >>> weight_range(4)
        (-8, 7)
    """
    if bits not in (4, 8):
        raise ValueError(f"weight bits must be 8 or 4, got {bits!r}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor | float,
    zero_point: torch.Tensor | int,
    qmin: int,
    qmax: int,
) -> torch.Tensor:
    """``(clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale``.

    ``scale`` and ``zero_point`` broadcast against ``x`` (reshape per-channel ones first).
    Rounding is half-to-even, as in ``torch.round`` and ONNX ``QuantizeLinear``. No gradient
    flows through the rounding (use a straight-through estimator for training).

    Example:
        >>> fake_quantize(torch.tensor([0.26, -1.0, 9.0]), 0.1, 0, -128, 127)
        tensor([ 0.3000, -1.0000,  9.0000])
    """
    q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def quantize_weight(
    w: torch.Tensor, bits: int = 8, *, per_channel: bool = True, symmetric: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize a weight tensor by its min/max: ``(q, scale, zero_point)``.

    Per channel means one scale per output channel (dim 0). Symmetric weights have zero point
    0 and ``scale = max|w| / qmax``; affine ones map ``[min(w, 0), max(w, 0)]`` onto the full
    integer range. ``q`` has ``w``'s shape: int8 when symmetric (4-bit values in ``[-8, 7]``),
    uint8 when affine (``[0, 255]``, or ``[0, 15]`` at 4 bits); ``scale`` is float32 and
    ``zero_point`` int64, both of shape ``(C_out,)`` per channel or ``()`` per tensor.

    Raises:
        ValueError: ``bits`` is not 8 or 4, ``w`` is empty or holds NaN/Inf.

    Example:
        >>> q, scale, zp = quantize_weight(torch.tensor([[0.5, -1.0], [0.2, 0.1]]))
        >>> q.tolist(), scale.tolist()
        ([[64, -127], [127, 64]], [0.007874015718698502, 0.0015748031437397003])
    """
    qmin, qmax = weight_range(bits)
    if w.numel() == 0:
        raise ValueError(f"cannot quantize an empty weight of shape {tuple(w.shape)}")
    w = w.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight holds NaN/Inf; fix or re-initialise the layer before quantizing")
    flat = w.reshape(w.shape[0], -1) if per_channel and w.ndim > 1 else w.reshape(1, -1)
    lo = flat.amin(dim=1).clamp(max=0)  # (C,)
    hi = flat.amax(dim=1).clamp(min=0)
    eps = torch.finfo(torch.float32).eps
    if symmetric:
        scale = (torch.maximum(-lo, hi) / qmax).clamp(min=eps)
        zp = torch.zeros_like(scale, dtype=torch.int64)
        qdtype = torch.int8
    else:
        qmin, qmax = 0, qmax - qmin
        scale = ((hi - lo) / (qmax - qmin)).clamp(min=eps)
        zp = torch.clamp(torch.round(-lo / scale), qmin, qmax).to(torch.int64)
        qdtype = torch.uint8
    shape = (-1,) + (1,) * (w.ndim - 1) if per_channel and w.ndim > 1 else ()
    q = torch.clamp(torch.round(w / scale.reshape(shape)) + zp.reshape(shape), qmin, qmax)
    if not (per_channel and w.ndim > 1):
        scale, zp = scale.reshape(()), zp.reshape(())
    return q.to(qdtype), scale.float(), zp


__all__ = ["fake_quantize", "quantize_weight", "weight_range"]
