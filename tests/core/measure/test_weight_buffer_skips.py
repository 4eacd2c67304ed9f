"""Float transforms on a quantized model: every int8 layer they would target is reported
skipped with what to do instead, ``strict`` refuses, and the model is left as it was."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from slimtorch.core.errors import TransformSkipError
from slimtorch.decompose import TuckerConfig, decompose_
from slimtorch.models import create_model
from slimtorch.prune import ChannelPruneConfig, MagnitudeConfig, NMConfig, prune_, prune_channels_
from slimtorch.quant import PTQConfig, quantize_

X = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
INT8 = ["conv1", "layer1.0.conv1", "layer3.2.conv2", "fc"]  # some of resnet20's 20 int8 layers

TRANSFORMS: dict[str, tuple[str, Callable[..., Any]]] = {
    "magnitude": ("prune", lambda m, **kw: prune_(m, MagnitudeConfig(sparsity=0.5), **kw)),
    "nm": ("prune", lambda m, **kw: prune_(m, NMConfig(), **kw)),
    "tucker": ("factorise", lambda m, **kw: decompose_(m, TuckerConfig(rank=0.5), **kw)),
    "channels": (
        "channel-prune",
        lambda m, **kw: prune_channels_(m, ChannelPruneConfig(ratio=0.5), X[:1], **kw),
    ),
}


def _int8_resnet20() -> nn.Module:
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_channels=1, input_size=28).eval()
    quantize_(model, PTQConfig(mode="static"), calibration=[X])
    return model


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_int8_layers_are_skipped_with_the_reason(name: str) -> None:
    verb, transform = TRANSFORMS[name]
    model = _int8_resnet20()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = transform(model, exclude=["layer2.*"])
    rows = {r.name: r for r in report.rows}
    for layer in INT8:
        kind = "QDQLinear" if layer == "fc" else "QDQConv2d"
        assert rows[layer].action == "skipped"
        assert rows[layer].reason == (
            f"its weights are stored as int8 ({kind}); {verb} the float model, then quantize it"
        )
    assert not any(n.startswith("layer2.") for n in rows)  # exclude still applies
    assert all(r.action == "skipped" for r in report.rows)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_strict_refuses_a_quantized_model(name: str) -> None:
    _, transform = TRANSFORMS[name]
    with pytest.raises(TransformSkipError, match="conv1: its weights are stored as int8"):
        transform(_int8_resnet20(), strict=True)
