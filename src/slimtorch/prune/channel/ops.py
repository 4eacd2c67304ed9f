"""The ops the channel walk (:mod:`.walk`) knows, by how they treat the channel axis.

Modules, functions and tensor methods are grouped by rule: channel-preserving one-input ops
(activations, dropout, casts), pooling, elementwise binary ops, reductions, and methods that
only read a tensor's metadata or build a new tensor from sizes. Ops with a rule of their own
(flatten, view/reshape, cat, softmax) are matched in the walk; any other op blocks the channels
that reach it.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
UNARY_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.ELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Identity, nn.Dropout,
    nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)  # fmt: skip
POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample,
)  # fmt: skip
UNARY_FUNCS: set[Any] = {
    torch.relu, torch.relu_, F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid,
    F.leaky_relu, F.elu, F.mish, F.softplus, F.hardtanh, torch.sigmoid, torch.tanh, F.dropout,
    F.dropout1d, F.dropout2d, F.dropout3d, torch.clone, torch.abs, torch.neg, torch.exp,
    torch.clamp, torch.clip, torch.square,
}  # fmt: skip
UNARY_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clone", "contiguous", "float",
    "half", "double", "bfloat16", "to", "type_as", "detach", "clamp", "clamp_", "clip", "clip_",
    "abs", "neg", "exp", "square",
}  # fmt: skip
# methods whose other tensor arguments only give a dtype/device (``x.to(y)``, ``x.type_as(y)``);
# any other unary op handed a second tensor (``clamp(a, min=b)``) combines it elementwise
CASTS = {"to", "type_as"}
POOL_FUNCS: set[Any] = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate,
}  # fmt: skip
BINARY: set[Any] = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
    torch.maximum, torch.minimum,
}  # fmt: skip
BINARY_METHODS = {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum",
}  # fmt: skip
REDUCE: set[Any] = {torch.mean, torch.sum, torch.amax}
REDUCE_METHODS = {"mean", "sum", "amax"}
META_METHODS = {"size", "dim", "numel"}
# methods that build a new tensor from sizes alone (``self`` gives only a dtype and device)
NEW_METHODS = {"new_ones", "new_zeros", "new_full", "new_empty"}
