"""Tied weights (one tensor in two layers) are pruned once and stay tied."""

from __future__ import annotations

import torch
from torch import nn

from slimtorch.prune import ChannelPruneConfig, MagnitudeConfig, prune_, prune_channels_


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_magnitude_pruning_counts_a_tied_weight_once() -> None:
    torch.manual_seed(0)
    model = _Tied()
    report = prune_(model, MagnitudeConfig(sparsity=0.5, scope="global"))
    rows = {r.name: r for r in report.rows}
    assert rows["b"].action == "tied" and "a's (tied)" in (rows["b"].reason or "")
    totals = report.to_dict()["totals"]
    assert totals["params"] == 16 * 16 + 16 * 4  # a's weight counted once, b's not again
    zeros = int((model.a.weight == 0).sum()) + int((model.c.weight == 0).sum())
    assert totals["zeros_after"] == zeros and model.a.weight is model.b.weight
    assert not report.skipped  # strict would not refuse: the tied layer is pruned through a


def test_channel_pruning_leaves_tied_layers_tied() -> None:
    torch.manual_seed(0)
    model = _Tied().eval()
    x = torch.randn(4, 16)
    before = model(x)
    report = prune_channels_(model, ChannelPruneConfig(ratio=0.5, round_to=1), example_input=x)
    assert model.a.weight is model.b.weight and model.a.weight.shape == (16, 16)
    reasons = " ".join(r.reason or "" for r in report.rows)
    assert "shares b.weight (tied weights), which slicing would untie" in reasons
    torch.testing.assert_close(model(x), before)
