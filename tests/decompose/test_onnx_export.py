"""Every factorised layer exports to ONNX and onnxruntime reproduces its outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from slimtorch.decompose import CPConv2d, LowRankConv2d, LowRankLinear, TTLinear, TuckerConv2d


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: TuckerConv2d(6, 10, 3, (4, 3), stride=2, padding=1), (2, 6, 9, 9)),
        (lambda: CPConv2d(6, 10, 3, 5, padding=(1, 0), dilation=(2, 1)), (2, 6, 9, 9)),
        (lambda: LowRankConv2d(6, 10, 1, stride=2), (2, 6, 9, 9)),
        (lambda: LowRankLinear(12, 8, 3), (5, 12)),
        (lambda: TTLinear((3, 4), (2, 4), (3,)), (5, 12)),
    ],
)
def test_factorised_layer_onnx_matches_torch(make, shape, tmp_path: Path) -> None:
    torch.manual_seed(0)
    layer: nn.Module = make().eval()
    x = torch.randn(*shape)
    path = tmp_path / "layer.onnx"
    torch.onnx.export(layer, (x,), str(path), input_names=["x"], output_names=["y"], dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["y"], {"x": x.numpy()})
    with torch.no_grad():
        want = layer(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
