"""Tests of slimtorch.core.measure.params: parameter counts and storage bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from slimtorch.core.measure import count_params, model_size_bytes, storage_bytes


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3, bias=False)  # 12
        self.b = nn.Linear(4, 3)  # 12 + 3
        self.b.weight = self.a.weight  # shared: 12 counted once
        self.register_buffer("steps", torch.zeros(3, dtype=torch.int64))


def test_shared_parameter_counted_once() -> None:
    assert count_params(Tied()) == 12 + 3


def test_trainable_only() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))  # 15 + 8
    model[0].weight.requires_grad_(False)
    assert count_params(model) == 23
    assert count_params(model, trainable_only=True) == 23 - 12


def test_storage_bytes_by_dtype() -> None:
    model = nn.Linear(10, 5).half()  # 55 fp16 values = 110 bytes
    model.register_buffer("index", torch.arange(3))  # int64: 24 bytes
    model.register_buffer("scale", torch.ones(4))  # float32: 16 bytes
    assert storage_bytes(model) == {"float16": 110, "float32": 16, "int64": 24}
    assert model_size_bytes(model) == 150


def test_shared_tensors_stored_once() -> None:
    # weight 12 fp32 (48 B) + b.bias 3 fp32 (12 B); int64 buffer 3 x 8 B
    assert storage_bytes(Tied()) == {"float32": 60, "int64": 24}


def test_batch_norm_storage() -> None:
    # weight, bias, running_mean, running_var: 4 x 8 fp32; num_batches_tracked: one int64
    assert storage_bytes(nn.BatchNorm2d(8)) == {"float32": 128, "int64": 8}


def test_rejects_non_modules() -> None:
    with pytest.raises(TypeError, match=r"model must be an nn\.Module, got Tensor"):
        count_params(torch.ones(2))  # type: ignore[arg-type]


def test_an_exported_int8_program_counts_its_int8_weights(tmp_path: Path) -> None:
    # profile --in counted 9,770 weights of an int8 model and profile --exported of its
    # program 90: the program's modules no longer carry the weight_buffers attribute
    from slimtorch.models import create_model, load_exported, save_exported
    from slimtorch.quant import PTQConfig, quantize_

    torch.manual_seed(0)
    model = create_model("lenet5", in_channels=1, input_size=28).eval()
    x = torch.randn(8, 1, 28, 28)
    quantize_(model, PTQConfig(mode="static"), calibration=x)
    program = load_exported(save_exported(model, x, tmp_path / "m.pt2"))
    assert count_params(program) == count_params(model) == 61706
