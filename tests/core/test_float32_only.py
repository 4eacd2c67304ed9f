"""Transforms that rebuild layers take a float32 model: on a cast_ model the layers they build
would lose the per-layer input casts, and the model would fail at its next forward pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimtorch.decompose import fuse_tucker_
from slimtorch.prune import ChannelPruneConfig, prune_channels_
from slimtorch.quant import (
    DirectConvConfig,
    GemmConvConfig,
    LowPrecisionConfig,
    MixedPrecisionConfig,
    PTQConfig,
    QATConfig,
    cast_,
    lower_conv_gemm_,
    lower_direct_conv_,
    mixed_precision_,
    prepare_qat_,
    quantize_,
)

X = torch.randn(2, 3, 8, 8)
CALLS = {
    "prune_channels_": lambda m: prune_channels_(m, ChannelPruneConfig(ratio=0.5), X),
    "fuse_tucker_": lambda m: fuse_tucker_(m),
    "lower_conv_gemm_": lambda m: lower_conv_gemm_(m, GemmConvConfig()),
    "lower_direct_conv_": lambda m: lower_direct_conv_(m, DirectConvConfig()),
    "quantize_": lambda m: quantize_(m, PTQConfig(), [X]),
    "prepare_qat_": lambda m: prepare_qat_(m, QATConfig()),
    "mixed_precision_": lambda m: mixed_precision_(m, MixedPrecisionConfig(size_ratio=2.0), [X]),
}


def _cast_net() -> nn.Module:
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4),
    ).eval()  # fmt: skip
    cast_(net, LowPrecisionConfig(dtype="bf16"), check_inputs=X)
    return net


@pytest.mark.parametrize("verb", sorted(CALLS))
def test_a_cast_model_is_refused_before_anything_changes(verb: str) -> None:
    net = _cast_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    types = [type(m) for m in net.modules()]
    with pytest.raises(ValueError, match=rf"torch\.bfloat16 tensors; {verb} takes a float32 model"):
        CALLS[verb](net)
    assert [type(m) for m in net.modules()] == types
    after = net.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert net(X).shape == (2, 4)  # still runs


@pytest.mark.parametrize("verb", ["prune_channels_", "lower_conv_gemm_", "lower_direct_conv_"])
def test_a_float64_model_is_taken(verb: str) -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 8 * 8, 4),
    ).double().eval()  # fmt: skip
    x = X.double()
    CALLS[verb](net) if verb != "prune_channels_" else prune_channels_(
        net, ChannelPruneConfig(ratio=0.5), x
    )
    assert net(x).dtype == torch.float64
