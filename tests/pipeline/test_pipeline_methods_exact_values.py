"""Exact values the compress methods hand the pipeline: pruning schedules, which methods ask
for calibration data, how many batches the low-precision check runs, and default profiles."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest
import torch
from torch import nn

import slimtorch.quant
from slimtorch.decompose import TuckerConfig, decompose_
from slimtorch.decompose.layers import TuckerConv2d
from slimtorch.models import create_model
from slimtorch.pipeline.methods import (
    COMPRESS_METHODS,
    MethodRequest,
    _channel_prune,
    _fuse_tucker,
    _prune,
)
from slimtorch.pipeline.quant_methods import _cast_options


def test_gradual_pruning_ramps_over_two_thirds_of_the_finetune_four_times_an_epoch() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    options = {"sparsity": 0.5, "gradual": True, "sparse_check": False}
    applied = _prune(model, MethodRequest(options=options, finetune_steps=30, steps_per_epoch=10))
    cb = applied.callbacks[0]
    assert cb.start_step == 0
    assert cb.end_step == (2 * 30) // 3 - 1  # 19: the last step of the first 20
    assert cb.frequency == 10 // 4  # 2


@pytest.mark.parametrize(("importance", "calls"), [("taylor", 1), ("l1", 0)])
def test_only_taylor_channel_pruning_reads_calibration_batches(importance: str, calls: int) -> None:
    seen: list[int] = []

    def calibration() -> Iterable[Any]:
        seen.append(1)
        g = torch.Generator().manual_seed(0)
        return [(torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g))]

    torch.manual_seed(0)
    model = create_model("lenet5", in_channels=1, input_size=28)
    request = MethodRequest(
        options={"ratio": 0.5, "importance": importance},
        example_input=torch.randn(2, 1, 28, 28),
        calibration=calibration,
    )
    _channel_prune(model, request)
    assert len(seen) == calls


def test_fuse_tucker_counts_folded_batch_norms_as_a_change() -> None:
    torch.manual_seed(0)
    model = create_model("resnet20", input_size=8).eval()
    decompose_(model, TuckerConfig(rank=0.5), include=["layer1.0.conv1"])
    layer = model.get_submodule("layer1.0.conv1")
    assert isinstance(layer, TuckerConv2d)
    layer.core.padding = "same"  # a core the fused kernel does not lower
    applied = _fuse_tucker(model, MethodRequest(options={}))
    # resnet20: the stem, two per block in 9 blocks, and 2 downsampling shortcuts
    assert len(applied.report["bn_folded"]) == 1 + 2 * 9 + 2
    assert applied.changed is True


def test_fp16_accuracy_check_runs_exactly_check_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, int] = {}
    real_cast = slimtorch.quant.cast_

    def spy(model: nn.Module, config: Any, **kwargs: Any) -> Any:
        seen["n"] = len(kwargs["check_inputs"])
        return real_cast(model, config, **kwargs)

    monkeypatch.setattr(slimtorch.quant, "cast_", spy)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 8, generator=g), torch.tensor([0, 1, 0, 1])) for _ in range(10)]
    apply = COMPRESS_METHODS.get("fp16")
    model = nn.Sequential(nn.Linear(8, 2)).eval()
    apply(model, MethodRequest(options={"check_batches": 2}, calibration=lambda: iter(batches)))
    assert seen["n"] == 2


def test_fp16_prices_on_the_rx580_by_default() -> None:
    assert _cast_options("fp16")({})[0] == "rx580"
