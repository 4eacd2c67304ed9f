"""Two 4-bit weights per byte: the on-disk form of 4-bit Q/DQ layers.

A 4-bit layer computes from int8 storage holding values in ``[-8, 7]`` (there is no int4
kernel on our targets: the weight is dequantized to float), but its state dict carries the
values packed two to a byte, so a saved model really is half the size of the int8 one. The low
nibble holds the even element, the high nibble the odd one (two's complement, 4 bits); an odd
count is padded with one zero nibble.

Example:
    >>> q = torch.tensor([[-8, 7, 0], [1, -1, 3]], dtype=torch.int8)
    >>> packed = pack_int4(q)
    >>> packed.dtype, packed.numel()
    (torch.uint8, 3)
    >>> torch.equal(unpack_int4(packed, q.shape), q)
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int8 values in ``[-8, 7]`` two per ``uint8`` (flattened; see the module docstring).

    Raises:
        ValueError: ``q`` is not int8 or holds values outside ``[-8, 7]``.
    """
    if q.dtype != torch.int8:
        raise ValueError(f"pack_int4 expects an int8 tensor, got {q.dtype}")
    flat = q.reshape(-1)
    if flat.numel() and (int(flat.min()) < -8 or int(flat.max()) > 7):
        raise ValueError(
            f"pack_int4 expects values in [-8, 7], got [{int(flat.min())}, {int(flat.max())}]"
        )
    nibbles = (flat.to(torch.int16) & 0xF).to(torch.uint8)  # (n,) two's complement nibbles
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    pairs = nibbles.reshape(-1, 2)  # (ceil(n/2), 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_int4(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: an int8 tensor of ``shape``.

    Raises:
        ValueError: ``packed`` is not uint8 or does not hold ``prod(shape)`` nibbles.
    """
    n = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (n + 1) // 2:
        raise ValueError(
            f"a packed 4-bit weight of shape {tuple(shape)} is a uint8 vector of {(n + 1) // 2} "
            f"bytes, got {packed.dtype} {tuple(packed.shape)}; the file does not match the layer"
        )
    low = (packed & 0xF).to(torch.int16)
    high = (packed >> 4).to(torch.int16)
    nibbles = torch.stack([low, high], dim=1).reshape(-1)[:n]  # (n,)
    values = torch.where(nibbles > 7, nibbles - 16, nibbles)
    return values.to(torch.int8).reshape(tuple(shape))
