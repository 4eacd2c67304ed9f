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
