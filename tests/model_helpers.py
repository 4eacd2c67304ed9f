"""Shared checks of the tests that a transform left a model untouched."""

from __future__ import annotations

import torch
from torch import nn


def same_model(a: nn.Module, b: nn.Module) -> bool:
    """Same module types in the same order and an identical state dict (keys and values)."""
    sa, sb = a.state_dict(), b.state_dict()
    return (
        sa.keys() == sb.keys()
        and all(torch.equal(sa[k], sb[k]) for k in sa)
        and [type(m) for m in a.modules()] == [type(m) for m in b.modules()]
    )


def grey_zoo_model(name: str, seed: int = 0) -> nn.Module:
    """A fresh eval-mode zoo model for 1x28x28 inputs, its weights drawn after ``seed``."""
    from slimtorch.models import create_model

    torch.manual_seed(seed)
    return create_model(name, in_channels=1, input_size=28).eval()


def tucker_resnet20(seed: int = 0) -> nn.Module:
    """:func:`grey_zoo_model` resnet20 with ``layer1.0.conv1`` Tucker-2 factorised at rank 0.5."""
    from slimtorch.decompose import TuckerConfig, decompose_

    model = grey_zoo_model("resnet20", seed)
    decompose_(model, TuckerConfig(rank=0.5), include=["layer1.0.conv1"])
    return model
