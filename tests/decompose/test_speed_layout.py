"""The speed check can time layers in channels-last layout without touching the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimtorch.decompose import TuckerConfig, decompose_, layer_speedup
from slimtorch.decompose.layers import TuckerConv2d


def test_channels_last_timing_leaves_the_layers_as_they_were() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1)
    fact = TuckerConv2d.from_layer(conv, (4, 4))
    check = layer_speedup(conv, fact, (2, 16, 8, 8), repeats=1, calls=1, channels_last=True)
    assert check.source == "measured:cpu,channels_last"
    assert check.original_s > 0 and check.factorised_s > 0
    # the given modules keep their contiguous weights
    assert conv.weight.is_contiguous()
    assert not conv.weight.is_contiguous(memory_format=torch.channels_last)
    plain = layer_speedup(conv, fact, (2, 16, 8, 8), repeats=1, calls=1)
    assert plain.source == "measured:cpu"


def test_channels_last_is_ignored_for_2d_inputs() -> None:
    lin = nn.Linear(8, 8)
    check = layer_speedup(lin, nn.Linear(8, 8), (4, 8), repeats=1, calls=1, channels_last=True)
    assert check.source == "measured:cpu"


def test_decompose_reports_the_layout_it_timed_in() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1))
    cfg = TuckerConfig(rank=0.25, min_speedup=1e-6, speed_channels_last=True)
    report = decompose_(net, cfg, example_input=torch.randn(2, 32, 8, 8))
    assert report.rows[0].action == "decomposed"
    assert report.rows[0].speed_source == "measured:cpu,channels_last"
    assert cfg.replace(speed_channels_last=False).speed_channels_last is False


def test_speed_channels_last_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="speed_channels_last must be True or False"):
        TuckerConfig(speed_channels_last="yes")  # type: ignore[arg-type]
