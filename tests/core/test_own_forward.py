"""Layers whose class overrides a torch layer's forward are never replaced by another module."""

from __future__ import annotations

import torch
from torch import nn

from slimtorch.decompose import SVDConfig, decompose_
from slimtorch.prune import MagnitudeConfig, prune_
from slimtorch.quant import lower_conv_gemm_, lower_direct_conv_
from slimtorch.sparse import sparsify_


class _Doubled(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


class _ReluConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


class _Plain(nn.Linear):
    """A subclass that only adds an attribute: it computes what nn.Linear does."""

    tag = "mine"


def test_decompose_skips_a_linear_with_its_own_forward() -> None:
    torch.manual_seed(0)
    own, plain = _Doubled(64, 64), _Plain(64, 64)
    for layer in (own, plain):  # exactly rank 4: SVD at rank 4 would be exact for nn.Linear
        layer.weight.data = torch.randn(64, 4) @ torch.randn(4, 64)
    net = nn.Sequential(own, plain)
    x = torch.randn(3, 64)
    before = net(x)
    rows = {r.name: r for r in decompose_(net, SVDConfig(rank=4)).rows}
    assert rows["0"].action == "skipped" and "forward of its own" in (rows["0"].reason or "")
    assert rows["1"].action == "decomposed"
    assert isinstance(net[0], _Doubled)
    torch.testing.assert_close(net(x), before, rtol=1e-4, atol=1e-3)


def test_conv_lowerings_skip_a_conv_with_its_own_forward() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 8, 9, 9)
    for lower in (lower_conv_gemm_, lower_direct_conv_):
        net = nn.Sequential(_ReluConv(8, 16, 3)).eval()
        before = net(x)
        rows = lower(net).rows
        assert [r.action for r in rows] == ["skipped"], lower.__name__
        assert "forward of its own" in (rows[0].reason or "")
        torch.testing.assert_close(net(x), before, rtol=0, atol=0)


def test_sparsify_skips_a_layer_with_its_own_forward() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(_Doubled(256, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    prune_(net, MagnitudeConfig(sparsity=0.95))
    x = torch.randn(4, 256)
    before = net(x)
    row = sparsify_(net, x, formats=["csr"]).rows[0]
    assert (row.action, row.reason) == (
        "skipped",
        "_Doubled subclasses nn.Linear with a forward of its own, which a replacement would drop; "
        "exclude it",
    )
    torch.testing.assert_close(net(x), before, rtol=0, atol=0)
