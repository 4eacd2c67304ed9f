"""Transforms and measurements leave the caller's random generator where it was."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from model_helpers import grey_zoo_model, tucker_resnet20
from slimtorch.core.measure import measure_latency, measure_peak_memory
from slimtorch.decompose import TuckerConfig, decompose_, fuse_tucker_
from slimtorch.models import load_model, save_model
from slimtorch.prune import ChannelPruneConfig, NMConfig, prune_, prune_channels_
from slimtorch.quant import lower_conv_gemm_
from slimtorch.quant.export import export_onnx
from slimtorch.sparse import build_sparse_layer, densify_


def _lenet() -> nn.Module:
    return grey_zoo_model("lenet5", 1)


def _resnet_tucker() -> nn.Module:
    return tucker_resnet20(1)


def _sparse() -> nn.Module:
    net = nn.Sequential(nn.Linear(16, 16))
    prune_(net, NMConfig())
    net[0] = build_sparse_layer(net[0], "csr")
    return net


class _Fails(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x  # data-dependent control flow: no export


def _saved(tmp_path: Path) -> Path:
    save_model(_lenet(), tmp_path / "m", input_shape=(1, 28, 28), mean=[0.5], std=[0.5],
               class_names=list("0123456789"))  # fmt: skip
    return tmp_path / "m"


X = torch.randn(2, 1, 28, 28)
X8 = torch.randn(4, 8)
DROPOUT = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5)).train()


def _export_fails(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        export_onnx(_Fails(), tmp_path / "f.onnx", X8[:1])


CALLS: dict[str, tuple[Callable[[], Any], Callable[[Any, Path], Any]]] = {
    "decompose_": (_lenet, lambda m, _: decompose_(m, TuckerConfig(rank=0.25))),
    "prune_channels_": (_lenet, lambda m, _: prune_channels_(m, ChannelPruneConfig(ratio=0.5), X)),
    "lower_conv_gemm_": (_lenet, lambda m, _: lower_conv_gemm_(m)),
    "fuse_tucker_": (_resnet_tucker, lambda m, _: fuse_tucker_(m)),
    "densify_": (_sparse, lambda m, _: densify_(m)),
    "load_model": (lambda: None, lambda _, tmp: load_model(tmp / "m")),
    "measure_latency": (lambda: DROPOUT, lambda m, _: measure_latency(m, X8)),
    "measure_peak_memory": (lambda: DROPOUT, lambda m, _: measure_peak_memory(m, X8, device="cpu")),
    "export_onnx (failing)": (lambda: None, lambda _, tmp: _export_fails(tmp)),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_the_callers_generator_is_left_where_it_was(name: str, tmp_path: Path) -> None:
    # layers a transform builds and then overwrites drew from it, so every later draw of the
    # caller depended on the ranks or widths chosen (and a timed dropout on the clock)
    build, call = CALLS[name]
    model = build()
    if name == "load_model":
        _saved(tmp_path)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    call(model, tmp_path)
    assert torch.equal(torch.rand(3), expected)
