"""The warning logged when an int8 slimtorch directory is loaded says what runs, and advises the
ONNX export only where that export runs int8 operators."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from slimtorch.models import create_model, save_model
from slimtorch.quant import PTQConfig, export_onnx, lower_conv_gemm_, ort_int8_ops, quantize_
from slimtorch.serve.model_config import ModelConfig, TensorSpec
from slimtorch.serve.runners import int8_note, load_runner

ADVICE = "serve its ONNX export (slimtorch export --format onnx, format 'onnx')"


def _model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("lenet5", in_channels=1, input_size=8).eval()
    calib = [torch.randn(16, 1, 8, 8)]
    if kind == "conv-gemm":
        lower_conv_gemm_(model)
    mode = {"weight-only": "weight_only", "dynamic": "dynamic"}.get(kind, "static")
    quantize_(model, PTQConfig(mode=mode), calibration=calib if mode == "static" else None)
    return model


@pytest.mark.parametrize(
    ("kind", "note"),
    [
        (
            "static",
            "holds int8 Q/DQ layers, which run simulated in float when served as a slimtorch "
            "directory (activations quantized and dequantized, weights dequantized on every "
            "call; slower than the float model); serve its ONNX export (slimtorch export "
            "--format onnx, format 'onnx') to run its int8 kernels in ONNX Runtime",
        ),
        (
            "weight-only",
            "holds weight-only int8 layers: their weights are dequantized to float on every "
            "call and the arithmetic runs in float (smaller files, no int8 kernels; its ONNX "
            "export has no int8 operators either)",
        ),
        (
            "conv-gemm",
            "holds int8 Q/DQ layers, which run simulated in float when served as a slimtorch "
            "directory (activations quantized and dequantized, weights dequantized on every "
            "call; slower than the float model); `slimtorch export --format onnx` refuses its "
            "GemmConv2d (conv-gemm) layers, so no ONNX int8 kernels are available for this model",
        ),
        (
            "dynamic",
            "holds int8 Q/DQ layers, which run simulated in float when served as a slimtorch "
            "directory (activations quantized and dequantized, weights dequantized on every "
            "call; slower than the float model); `slimtorch export --format onnx` refuses its "
            "dynamic-quantization layers (their input scale is computed per batch), so no ONNX "
            "int8 kernels are available for this model",
        ),
    ],
)
def test_int8_warning_says_what_runs_and_advises_onnx_only_where_it_runs_int8(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str, note: str
) -> None:
    model = _model(kind)
    folder = save_model(
        model,
        tmp_path / kind / "1",
        input_shape=(1, 8, 8),
        mean=[0.3],
        std=[0.4],
        class_names=[str(i) for i in range(10)],
    )
    config = ModelConfig(
        name=kind,
        format="slimtorch",
        inputs=(TensorSpec(name="input", dims=(1, 8, 8)),),
        outputs=(TensorSpec(name="logits", dims=(10,)),),
    )
    with caplog.at_level("WARNING", logger="slimtorch.serve.runners"):
        load_runner(folder, config, "cpu").close()
    # the runner's own warnings (another test's CLI run may have left slimtorch's INFO lines on)
    said = [
        r.getMessage()
        for r in caplog.records
        if r.name == "slimtorch.serve.runners" and r.levelno >= logging.WARNING
    ]
    assert said == [f"model {kind!r} {note}"]
    # the advice is true of the model at hand: its ONNX export runs int8 operators exactly
    # where the export is advised
    x = torch.randn(2, 1, 8, 8)
    if kind in ("conv-gemm", "dynamic"):
        with pytest.raises(ValueError, match=r"GemmConv2d|dynamic-quantization"):
            export_onnx(model, tmp_path / "m.onnx", x)
    else:
        path = export_onnx(model, tmp_path / "m.onnx", x, narrow_convs="int8")
        assert bool(ort_int8_ops(path)) == (ADVICE in note)


def test_float_model_has_no_note() -> None:
    assert int8_note(create_model("lenet5", in_channels=1, input_size=8)) is None
