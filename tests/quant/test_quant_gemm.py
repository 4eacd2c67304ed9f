"""Convolutions as im2col + linear: exact against nn.Conv2d, int8 equivalence, skips, save/load,
fx tracing of lowered models, compiled with inductor's GEMM templates."""

from __future__ import annotations

import copy
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch import nn

from slimtorch.core.errors import TransformSkipError
from slimtorch.models import create_model, load_model, save_model
from slimtorch.quant import (
    DirectConvConfig,
    PTQConfig,
    QDQAct,
    compile_int8_x86,
    export_onnx,
    lower_direct_conv_,
    quantize_,
)
from slimtorch.quant.direct import DirectConv2d
from slimtorch.quant.gemm import GemmConv2d, GemmConvConfig, lower_conv_gemm_
from slimtorch.quant.qdq import QDQConv2d, QDQLinear


@pytest.mark.parametrize(
    ("c_in", "kernel", "stride", "padding", "dilation", "bias"),
    [
        (4, 3, 1, 1, 1, False),
        (3, 3, 2, 1, 1, True),
        (2, (3, 5), (1, 2), (0, 2), 1, True),
        (5, 3, 1, 2, 2, True),
        (8, 1, 2, "valid", 1, False),
    ],
)
def test_gemm_conv_equals_conv2d(c_in, kernel, stride, padding, dilation, bias) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, 7, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias)
    gemm = GemmConv2d.from_conv(conv).double()
    x = torch.randn(3, c_in, 13, 12, dtype=torch.float64)
    torch.testing.assert_close(gemm(x), conv.double()(x), rtol=1e-12, atol=1e-12)
    assert gemm.out_channels == 7


def test_channels_last_and_offset_inputs_and_gradients() -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 5, 1).double()  # 1x1, no padding: the patches view the input itself
    gemm = GemmConv2d.from_conv(conv)
    big = torch.randn(4, 6, 9, 9, dtype=torch.float64)
    for x in (big.to(memory_format=torch.channels_last), big[1:3]):
        torch.testing.assert_close(gemm(x), conv(x), rtol=1e-12, atol=1e-12)
    conv3 = nn.Conv2d(3, 4, 3, padding=1).double()
    gemm3 = GemmConv2d.from_conv(conv3)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64, requires_grad=True)
    (g_ref,) = torch.autograd.grad(conv3(x).square().sum(), x)
    (g,) = torch.autograd.grad(gemm3(x).square().sum(), x)
    torch.testing.assert_close(g, g_ref)


def test_bad_input_and_unlowerable_layers_are_refused() -> None:
    gemm = GemmConv2d.from_conv(nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match=r"GemmConv2d expects \(N, 4, H, W\)"):
        gemm(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="too small"):
        gemm(torch.randn(1, 4, 2, 2))
    for conv, why in [
        (nn.Conv2d(4, 4, 3, groups=2), "groups=2"),
        (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "padding_mode"),
        (nn.Conv2d(4, 4, 3, padding="same"), "padding='same'"),
    ]:
        with pytest.raises(ValueError, match=why):
            GemmConv2d.from_conv(conv)
    with pytest.raises(ValueError, match="36 features"):
        GemmConv2d(4, nn.Linear(9, 2), kernel_size=(3, 3))
    with pytest.raises(ValueError, match="min_k"):
        GemmConvConfig(min_k=0)
    net = nn.Sequential(nn.Conv2d(4, 4, 3))
    lower_conv_gemm_(net)
    with pytest.raises(ValueError, match=r"^0 is a GemmConv2d"):
        export_onnx(net, Path("unused.onnx"), torch.randn(1, 4, 8, 8))


def test_resnet_lowers_exactly_folds_bn_and_traces() -> None:
    torch.manual_seed(2)
    model = create_model("resnet20", in_channels=1, input_size=28).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        before = model(x)
    lower_direct_conv_(model)
    report = lower_conv_gemm_(model)
    assert len(report.lowered) == 20 and len(report.folded) == 20
    assert [r.conv for r in report.rows if r.action == "skipped"] == []  # stem is direct now
    assert isinstance(model.conv1, DirectConv2d)
    assert isinstance(model.layer2[0].shortcut[0], GemmConv2d)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-4)
    # fx-based passes must still trace the lowered model (residual adds, Q/DQ placement)
    graph = torch.fx.symbolic_trace(model).graph
    assert sum(n.op == "call_module" and n.target.endswith(".linear") for n in graph.nodes) == 20
    assert [e["name"] for e in model.slimtorch_arch["transforms"]][-1] == "quant.conv_gemm"


def test_int8_patches_equal_quantized_patches() -> None:
    """Quantizing the map then copying uint8 patches (padding = zero point) is the same
    computation as the Q/DQ linear applied to float patches."""
    torch.manual_seed(3)
    model = create_model("resnet20", in_channels=1, input_size=28).eval()
    lower_direct_conv_(model)
    lower_conv_gemm_(model)
    calib = [(torch.randn(8, 1, 28, 28), torch.zeros(8, dtype=torch.long)) for _ in range(3)]
    quantize_(model, PTQConfig(mode="static"), calibration=calib)
    layer = model.layer1[0].conv1
    assert isinstance(layer, GemmConv2d) and isinstance(layer.linear, QDQLinear)
    assert layer.linear.input_scale is not None
    x = torch.relu(torch.randn(2, 16, 28, 28))
    h, w = 28, 28
    reference = layer.linear(layer._patches(x, h, w, 0.0)).view(2, h, w, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(layer(x), reference, rtol=0, atol=1e-6)
    assert not any(isinstance(m, QDQConv2d) for m in model.modules())
    # eagerly the map is dequantized before the patch copy; traced for inductor, after it
    # (the pattern its int8 GEMM takes): the two give identical outputs
    with mock.patch.object(torch.compiler, "is_compiling", return_value=True):
        pattern = layer(x)
    torch.testing.assert_close(layer(x), pattern, rtol=0, atol=0)


def test_skips_strict_and_globs() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 8, 3, groups=2), nn.Conv2d(8, 8, 3))
    with pytest.raises(TransformSkipError, match=r"0: patch length 9 < min_k=16.*1: groups=2"):
        lower_conv_gemm_(net, strict=True)
    assert all(isinstance(m, nn.Conv2d) for m in net)  # nothing changed
    with pytest.raises(ValueError, match="match no module"):
        lower_conv_gemm_(net, include=["stem"])
    report = lower_conv_gemm_(net, exclude=["0"])
    assert [(r.conv, r.action) for r in report.rows] == [("1", "skipped"), ("2", "gemm")]
    assert isinstance(net[2], GemmConv2d) and isinstance(net[0], nn.Conv2d)
    assert report.to_dict()["lowered"] == 1 and "groups=2" in report.to_table()


def test_lowered_quantized_model_round_trips_through_save_load(tmp_path: Path) -> None:
    torch.manual_seed(4)
    model = create_model("resnet20", num_classes=3, in_channels=1, input_size=28).eval()
    lower_direct_conv_(model)
    lower_conv_gemm_(model)
    calib = [(torch.randn(8, 1, 28, 28), torch.zeros(8, dtype=torch.long)) for _ in range(2)]
    quantize_(model, PTQConfig(mode="static"), calibration=calib)
    save_model(model, tmp_path / "m", input_shape=(1, 28, 28), mean=[0.0], std=[1.0],
               class_names=["a", "b", "c"])  # fmt: skip
    loaded, _ = load_model(tmp_path / "m")
    assert isinstance(loaded.layer3[2].conv2, GemmConv2d)
    assert isinstance(loaded.layer3[2].conv2.linear, QDQLinear)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


class _Residual(nn.Module):
    """stem -> conv -> ReLU -> conv, + skip -> ReLU -> pool -> linear: a small ResNet block."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu0, self.relu1, self.relu2 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu0(self.stem(x))
        y = self.relu2(self.conv2(self.relu1(self.conv1(h))) + h)
        return self.fc(y.mean((2, 3)))


def test_compiled_with_gemm_templates_matches_eager() -> None:
    """fp32 and int8 through compile_int8_x86 with max_autotune (inductor's C++ GEMMs), with
    the stem channels-last and the residual add's Q/DQ dropped by the inductor placement."""
    torch.manual_seed(5)
    model = _Residual().eval()
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        before = model(x)
    lower_direct_conv_(model, DirectConvConfig(channels_last=True))
    lower_conv_gemm_(model)
    int8 = copy.deepcopy(model)
    calib = [(torch.randn(8, 1, 12, 12), torch.zeros(8, dtype=torch.long)) for _ in range(2)]
    quantize_(int8, PTQConfig(mode="static"), calibration=calib)
    assert isinstance(int8.relu2, QDQAct)  # the add's output is quantized for portability
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
        fast = compile_int8_x86(model, x, max_autotune=True)
        torch.testing.assert_close(fast(x), before, rtol=1e-4, atol=1e-4)
        fast8 = compile_int8_x86(int8, x, max_autotune=True)
        assert not isinstance(fast8.model.relu2, QDQAct)  # placed for inductor: add stays float
        ref8 = fast8.model(x)  # eager, same placement
        torch.testing.assert_close(fast8(x), ref8, rtol=0, atol=0.05 * float(ref8.abs().max()))


def test_int8_gemm_with_a_1x1_output_map_compiles() -> None:
    """vgg11-bn's last convolutions run on 1x1 maps at 28x28 inputs; their 4-D output view once
    broke inductor's int8 GEMM epilogue at compile time. They return a plain view now."""
    torch.manual_seed(6)
    net = create_model("vgg11-bn", in_channels=1, input_size=28).eval()
    lower_direct_conv_(net, DirectConvConfig(channels_last=True))
    lower_conv_gemm_(net)
    calib = [(torch.randn(8, 1, 28, 28), torch.zeros(8, dtype=torch.long)) for _ in range(2)]
    quantize_(net, PTQConfig(mode="static"), calibration=calib)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        ref = net(x)
        fast = compile_int8_x86(net, x, max_autotune=True)
        torch.testing.assert_close(fast(x), ref, rtol=0, atol=0.05 * float(ref.abs().max()))
