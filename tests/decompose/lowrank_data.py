"""Seeded random tensors (float64 by default) for the decomposition tests."""

from __future__ import annotations

import torch


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=dtype)


def orth(gen: torch.Generator, n: int, r: int) -> torch.Tensor:
    """An ``(n, r)`` matrix with orthonormal columns."""
    q, _ = torch.linalg.qr(randn(gen, n, r))
    return q
