"""A model on the meta device (shapes, no values) is refused by name by every transform."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from slimtorch.models import create_model, save_model
from slimtorch.prune import ChannelPruneConfig, MagnitudeConfig, prune_, prune_channels_
from slimtorch.quant import (
    LowPrecisionConfig,
    PTQConfig,
    QATConfig,
    cast_,
    fold_bn_,
    lower_conv_gemm_,
    lower_direct_conv_,
    prepare_qat_,
    quantize_,
)
from slimtorch.sparse import sparsify_

_X = torch.randn(2, 1, 28, 28)
TRANSFORMS: dict[str, Callable[[nn.Module], Any]] = {
    "prune_": lambda m: prune_(m, MagnitudeConfig(sparsity=0.5)),
    "prune_channels_": lambda m: prune_channels_(m, ChannelPruneConfig(), example_input=_X),
    "fold_bn_": fold_bn_,
    "quantize_": lambda m: quantize_(m, PTQConfig(mode="dynamic")),
    "prepare_qat_": lambda m: prepare_qat_(m, QATConfig()),
    "lower_conv_gemm_": lower_conv_gemm_,
    "lower_direct_conv_": lower_direct_conv_,
    "sparsify_": lambda m: sparsify_(m, _X),
    "cast_": lambda m: cast_(m, LowPrecisionConfig(max_output_error=None, max_accuracy_drop=None)),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_transforms_refuse_a_meta_model(name: str) -> None:
    model = create_model("lenet5", in_channels=1, input_size=28).to("meta")
    with pytest.raises(ValueError, match=rf"{name} needs the model's values, but \d+ of its"):
        TRANSFORMS[name](model)


def test_save_model_refuses_a_meta_model(tmp_path: Path) -> None:
    model = create_model("lenet5", in_channels=1, input_size=28).to("meta")
    with pytest.raises(ValueError, match="save_model needs the model's values"):
        save_model(model, tmp_path / "m", input_shape=(1, 28, 28), mean=[0.5], std=[0.5],
                   class_names=list("0123456789"))  # fmt: skip
    assert not (tmp_path / "m").exists()
