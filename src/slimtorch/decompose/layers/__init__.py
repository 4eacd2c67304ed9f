"""Factorised layers: ordinary dense layers in sequence, exportable with torch.export and ONNX."""

from __future__ import annotations

from slimtorch.decompose.layers._common import LAYER_KINDS
from slimtorch.decompose.layers.cp_conv import CPConv2d
from slimtorch.decompose.layers.lowrank import LowRankConv2d, LowRankLinear
from slimtorch.decompose.layers.tt_linear import TTLinear
from slimtorch.decompose.layers.tucker_conv import TuckerConv2d

__all__ = ["LAYER_KINDS", "CPConv2d", "LowRankConv2d", "LowRankLinear", "TTLinear", "TuckerConv2d"]
