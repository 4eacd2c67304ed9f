"""GraphedForward: eager on the CPU, graph replay on CUDA with outputs equal to eager."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimtorch.core.measure import GraphedForward


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval()


def test_cpu_input_runs_eagerly() -> None:
    net = _net()
    fwd = GraphedForward(net)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(fwd(x), net(x))
    assert len(fwd) == 0  # nothing captured


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="callable"):
        GraphedForward(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="warmup"):
        GraphedForward(_net(), warmup=0)
    with pytest.raises(TypeError, match="one tensor"):
        GraphedForward(_net())([1, 2])  # type: ignore[arg-type]


@pytest.mark.gpu
def test_cuda_replay_matches_eager_per_shape() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    net = _net().cuda()
    fwd = GraphedForward(net)
    for batch in (1, 4, 1):
        x = torch.randn(batch, 1, 8, 8, device="cuda")
        with torch.no_grad():
            want = net(x)
        torch.testing.assert_close(fwd(x), want)
    assert len(fwd) == 2  # one graph per shape, reused
    fwd.reset()
    assert len(fwd) == 0
