"""FLOPs of the products torch's own table leaves out, counted by hand."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.core.measure import count_flops


class _Call(nn.Module):
    def __init__(self, fn: Callable[..., Any], *children: nn.Module) -> None:
        super().__init__()
        self.fn, self.children_ = fn, nn.ModuleList(children)

    def forward(self, *args: Any) -> Any:
        return self.fn(*args)


def _cases() -> list[tuple[str, nn.Module, tuple[torch.Tensor, ...], int]]:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    lstm = nn.LSTM(16, 32, batch_first=True)
    bil = nn.Bilinear(8, 8, 4)
    mat = torch.randn(6, 8)
    return [
        # Q K^T and P V: 2 * (B * H) * Lq * Lk * (D + D)
        ("sdpa", _Call(lambda q: F.scaled_dot_product_attention(q, q, q)),
         (torch.randn(2, 4, 16, 8),), 2 * 8 * 16 * 16 * 16),
        # in-projections of q, k, v, attention (two products), out-projection; N=2, L=5, E=32
        ("mha", _Call(lambda q: mha(q, q, q)[0], mha), (torch.randn(2, 5, 32),),
         2 * 2 * 32 * 32 * 15 + 4 * 2 * 5 * 5 * 32 + 2 * 2 * 5 * 32 * 32),
        # 10 steps (2 sequences x 5), gates 4 * 32 from a 16-input and a 32-state
        ("lstm", _Call(lambda x: lstm(x)[0], lstm), (torch.randn(2, 5, 16),),
         2 * 10 * (128 * 16 + 128 * 32)),
        ("bilinear", _Call(lambda a: bil(a, a), bil), (torch.randn(3, 8),), 2 * 3 * 4 * 8 * 8),
        ("mv", _Call(lambda v: mat @ v), (torch.randn(8),), 2 * 6 * 8),
        ("dot", _Call(lambda v: v @ v), (torch.randn(8),), 2 * 8),
    ]  # fmt: skip


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_products_are_counted_as_products(
    case: tuple[str, nn.Module, tuple[torch.Tensor, ...], int],
) -> None:
    _, module, inputs, expected = case
    with torch.no_grad():
        report = count_flops(module, *inputs)
    assert report.total_flops >= expected  # plus the elementwise ops around the product
    assert report.total_flops < expected * 1.2
