"""fuse_tucker_ leaves a batch norm whose weight or bias holds NaN/Inf unfused, as fold_bn_
does, instead of folding the bad values into the fused layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimtorch.decompose import FusedTuckerConv2d, TuckerConfig, decompose_, fuse_tucker_


def _decomposed(affine: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16, affine=affine), nn.ReLU()
    ).eval()
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    decompose_(net, TuckerConfig(rank=0.5))
    return net


@pytest.mark.parametrize(("tensor", "bad"), [("weight", "nan"), ("bias", "inf")])
def test_a_batch_norm_with_non_finite_weight_or_bias_is_not_fused(tensor: str, bad: str) -> None:
    net = _decomposed()
    with torch.no_grad():
        getattr(net[1], tensor)[0] = float(bad)
    report = fuse_tucker_(net)
    (row,) = report.rows
    assert (row.action, row.bn) == ("fused", None)
    assert row.reason == (
        "batch norm 1 left as is: the batch norm's weights or running statistics hold NaN/Inf"
    )
    assert isinstance(net[0], FusedTuckerConv2d) and type(net[1]) is nn.BatchNorm2d
    fused = {n: t for n, t in net[0].state_dict().items() if t.is_floating_point()}
    assert all(bool(torch.isfinite(t).all()) for t in fused.values()), sorted(fused)
    assert not bool(torch.isfinite(getattr(net[1], tensor)).all())  # left where it was


def test_a_batch_norm_without_affine_parameters_is_still_fused() -> None:
    net = _decomposed(affine=False)
    x = torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        before = net(x)
    (row,) = fuse_tucker_(net).rows
    assert (row.action, row.bn, row.relu, row.reason) == ("fused", "1", "2", None)
    assert type(net[1]) is nn.Identity
    with torch.no_grad():
        torch.testing.assert_close(net(x), before, atol=1e-4, rtol=1e-4)
