"""Quantization: post-training int8 (weight-only, dynamic, static), Q/DQ modules, int8
runtimes (x86 inductor, ONNX Runtime, torchao on CUDA) and int8 timed in them against float,
ONNX export, quantization-aware
training (LSQ), batch-norm folding, direct few-tap convolutions fused with their pooling,
convolutions as im2col + linear for inductor's GEMM templates,
FP16/BF16 casts and per-layer mixed precision.

Importing this package registers the ``quant.*`` architecture transforms, so ``load_model``
rebuilds quantized, folded and cast models; it imports no onnx, onnxruntime or torchao.

Example:
    >>> from slimtorch.models import create_model
    >>> from slimtorch.quant import PTQConfig, quantize_
    >>> model = create_model("lenet5", in_channels=1, input_size=28).eval()
    >>> batches = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(2)]
    >>> report = quantize_(model, PTQConfig(mode="static"), calibration=batches)
    >>> len(report.quantized), type(model.fc1).__name__
    (5, 'QDQLinear')
    >>> model(torch.randn(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

# qdq first: it re-exports to_qdq_ from convert, which builds on qdq's layers
from slimtorch.quant.qdq import (
    LayerQParams,
    QDQConv2d,
    QDQLinear,
    fake_quantize,
    quantize_weight,
    weight_range,
)

# isort: split
from slimtorch.quant.convert import ActQParams, QDQAct, QuantReport, QuantRow, to_qdq_
from slimtorch.quant.direct import DirectConv2d, DirectConvConfig, lower_direct_conv_
from slimtorch.quant.export import (
    check_onnx,
    compare_onnx,
    export_onnx,
    ort_int8_ops,
    ort_session,
    run_onnx,
)
from slimtorch.quant.fold import fold_bn_, fold_conv_bn
from slimtorch.quant.gemm import GemmConv2d, GemmConvConfig, lower_conv_gemm_
from slimtorch.quant.int8_runtimes import RuntimeTiming, time_int8_runtimes
from slimtorch.quant.lowp import LowPrecisionConfig, PrecisionCheckError, cast_, precision_gain
from slimtorch.quant.lsq import LSQConv2d, LSQLinear
from slimtorch.quant.mixed import MixedPrecisionConfig, mixed_precision_
from slimtorch.quant.mixed_sensitivity import measure_sensitivity
from slimtorch.quant.observers import CalibrationError, make_observer
from slimtorch.quant.placement import place_qdq_
from slimtorch.quant.precision import set_precision_
from slimtorch.quant.ptq import PTQConfig, quantize_, residual_points
from slimtorch.quant.qat import QATCallback, QATConfig, prepare_qat_
from slimtorch.quant.qat_convert import convert_qat_
from slimtorch.quant.runtime import compile_int8_x86, cpu_int8_support, int8_kernels, torchao_cuda_

__all__ = [
    "ActQParams",
    "CalibrationError",
    "DirectConv2d",
    "DirectConvConfig",
    "GemmConv2d",
    "GemmConvConfig",
    "LSQConv2d",
    "LSQLinear",
    "LayerQParams",
    "LowPrecisionConfig",
    "MixedPrecisionConfig",
    "PTQConfig",
    "PrecisionCheckError",
    "QATCallback",
    "QATConfig",
    "QDQAct",
    "QDQConv2d",
    "QDQLinear",
    "QuantReport",
    "QuantRow",
    "RuntimeTiming",
    "cast_",
    "check_onnx",
    "compare_onnx",
    "compile_int8_x86",
    "convert_qat_",
    "cpu_int8_support",
    "export_onnx",
    "fake_quantize",
    "fold_bn_",
    "fold_conv_bn",
    "int8_kernels",
    "lower_conv_gemm_",
    "lower_direct_conv_",
    "make_observer",
    "measure_sensitivity",
    "mixed_precision_",
    "ort_int8_ops",
    "ort_session",
    "place_qdq_",
    "precision_gain",
    "prepare_qat_",
    "quantize_",
    "quantize_weight",
    "residual_points",
    "run_onnx",
    "set_precision_",
    "time_int8_runtimes",
    "to_qdq_",
    "torchao_cuda_",
    "weight_range",
]
