"""Q/DQ placement per runtime (place_qdq_): inductor conv+add fusion, ONNX Runtime QLinearConv."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from slimtorch.models import create_model, load_model, save_model
from slimtorch.quant.convert import QDQAct, to_qdq_
from slimtorch.quant.export import export_onnx, ort_int8_ops, ort_session, run_onnx
from slimtorch.quant.placement import place_qdq_
from slimtorch.quant.ptq import PTQConfig, quantize_
from slimtorch.quant.qdq import LayerQParams, QDQConv2d, quantize_weight
from slimtorch.quant.runtime import compile_int8_x86


class _Plain(nn.Module):
    """conv-ReLU-maxpool-conv-ReLU, global pooling, linear: a VGG in miniature."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(1, 8, 3, padding=1)
        self.relu0 = nn.ReLU()
        self.pool0 = nn.MaxPool2d(2)
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool0(self.relu0(self.conv0(x)))
        x = self.relu1(self.conv1(x))
        return self.fc(torch.flatten(self.avg(x), 1))


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride), nn.Identity())
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.conv2(self.relu1(self.conv1(x))) + self.shortcut(x))


class _Res(nn.Module):
    """A stem, an identity block and a projection block (as in resnet20), then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.block1 = _Block(8, 8, 1)
        self.block2 = _Block(8, 16, 2)
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.relu(self.conv(x))))
        return self.fc(torch.flatten(self.avg(x), 1))


def _data(n: int = 16, size: int = 12) -> torch.Tensor:
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(3))


def _resnet(small: bool = False) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if small:
        model, x = _Res().eval(), _data(32)
    else:
        model, x = create_model("resnet20", in_channels=1, input_size=28).eval(), _data(8, 28)
    quantize_(model, PTQConfig(mode="static"), calibration=[x])
    return model, x


def test_inductor_placement_keeps_one_add_input_quantized() -> None:
    model, x = _resnet(small=True)
    with torch.no_grad():
        ref = model(x)
    placed = place_qdq_(model, "inductor")
    assert sorted(placed.changes) == ["block1.conv2", "block2.conv2"]
    assert model.block1.conv2.output_scale is None and model.block2.conv2.output_scale is None
    # the projection shortcut keeps its output Q/DQ: the add's int8 second operand
    assert model.block2.shortcut[0].output_scale is not None
    assert place_qdq_(model, "inductor").changes == {}  # placed once, nothing more to move
    with torch.no_grad():
        out = model(x)
    assert float((out - ref).abs().max()) <= 0.05 * float(ref.abs().max())
    assert float((out.argmax(1) == ref.argmax(1)).float().mean()) >= 0.9


def test_placed_resnet_is_recorded_and_reloads(tmp_path) -> None:
    torch.manual_seed(0)
    model = create_model("resnet20", in_channels=1, input_size=8).eval()
    x = _data(8, 8)
    quantize_(model, PTQConfig(mode="static"), calibration=[x])
    assert len(place_qdq_(model, "inductor").changes) == 9
    with torch.no_grad():
        out = model(x)
    save_model(model, tmp_path / "m", input_shape=(1, 8, 8), mean=[0.5], std=[0.5],
               class_names=[str(i) for i in range(10)])  # fmt: skip
    loaded, _ = load_model(tmp_path / "m")
    assert loaded.layer1[0].conv2.output_scale is None
    assert loaded.layer2[0].shortcut[0].output_scale is not None
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), out)


def test_inductor_placement_leaves_plain_convnets_alone() -> None:
    model = _Plain().eval()
    x = _data()
    quantize_(model, PTQConfig(mode="static"), calibration=[x])
    with torch.no_grad():
        ref = model(x)
    assert place_qdq_(model, "inductor").changes == {}  # no residual add: nothing to fuse
    assert place_qdq_(model, "portable").changes == {}
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=0.0, rtol=0.0)


def test_onnxruntime_placement_quantizes_float_conv_outputs(tmp_path) -> None:
    model = _Plain().eval()
    x = _data(32)
    quantize_(model, PTQConfig(mode="static"), calibration=[x])
    before = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="conv1: output stays float"):
        uncalibrated = place_qdq_(copy.deepcopy(model), "onnxruntime")
    assert uncalibrated.changes == {} and "conv1" in uncalibrated.notes[0]
    path = export_onnx(model, tmp_path / "q.onnx", x[:1], calibration=[x], narrow_convs="int8")
    assert ort_int8_ops(path).get("QLinearConv", 0) == 2
    for a, b in zip(model.state_dict().values(), before.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # export placed a copy
    assert not isinstance(model.relu1, QDQAct)
    placed = place_qdq_(model, "onnxruntime", calibration=[x])
    assert list(placed.changes) == ["relu1"] and isinstance(model.relu1, QDQAct)
    with torch.no_grad():
        ref = model(x)
    got = run_onnx(ort_session(path), x)
    assert float((got - ref).abs().max()) <= 0.05 * float(ref.abs().max())
    assert float((got.argmax(1) == ref.argmax(1)).float().mean()) >= 0.9


def test_onnxruntime_placement_leaves_quantized_resnet_alone() -> None:
    model, _ = _resnet(small=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every conv output already reaches an int8 op
        assert place_qdq_(model, "onnxruntime").changes == {}


def test_to_qdq_target_is_recorded_and_bad_targets_raise(tmp_path) -> None:
    model = _Plain().eval()
    model.slimtorch_arch = {"name": "custom", "kwargs": {}}
    qp = {
        n: LayerQParams(weight_scale=quantize_weight(m.weight)[1], input_scale=0.05)
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    }
    with pytest.warns(UserWarning, match="conv1: output stays float"):
        report = to_qdq_(model, qp, target="onnxruntime")  # no parameters for conv1's output
    assert report.info["placement"]["changes"] == {}
    assert "conv1" in report.info["placement"]["notes"][0]
    assert isinstance(model.conv0, QDQConv2d) and not isinstance(model.relu1, QDQAct)
    res = _Res().eval()
    res.slimtorch_arch = {"name": "custom", "kwargs": {}}
    qp = {
        n: LayerQParams(weight_scale=quantize_weight(m.weight)[1], input_scale=0.05,
                        output_scale=0.1 if n.endswith(("conv2", "shortcut.0")) else None)
        for n, m in res.named_modules()
        if isinstance(m, nn.Conv2d)
    }  # fmt: skip
    report = to_qdq_(res, qp, target="inductor")
    assert sorted(report.info["placement"]["changes"]) == ["block1.conv2", "block2.conv2"]
    layers = report.entries[0]["params"]["layers"]  # the record holds the placed layers
    assert layers["block1.conv2"]["output_scale"] is None
    assert layers["block2.shortcut.0"]["output_scale"] == 0.1
    for call in (
        lambda: place_qdq_(model, "tensorrt"),
        lambda: to_qdq_(_Plain(), {}, target="gpu"),
        lambda: export_onnx(model, tmp_path / "x.onnx", _data(1), target="ort"),
        lambda: compile_int8_x86(model, target="x86"),
    ):
        with pytest.raises(ValueError, match="target must be one of portable, inductor"):
            call()


@pytest.mark.slow
def test_inductor_fuses_residual_adds_into_qconv() -> None:
    from slimtorch.quant.runtime import cpu_int8_support, int8_kernels

    if not cpu_int8_support()["onednn"]:
        pytest.skip("no oneDNN in this PyTorch build")
    model, x = _resnet()
    portable = int8_kernels(model, x[:2], target="portable")
    fused = int8_kernels(model, x[:2])
    assert portable.get("qconv2d_pointwise.binary", 0) == 0
    assert fused == {"qconv_pointwise": 12, "qconv2d_pointwise.binary": 9, "qlinear_pointwise": 1}
    fast = compile_int8_x86(model, x)
    placed = copy.deepcopy(model)
    place_qdq_(placed, "inductor")
    with torch.no_grad():
        ref = placed(x)
    torch.testing.assert_close(fast(x), ref, atol=0.05 * float(ref.abs().max()), rtol=0.05)


class _SharedAddInput(nn.Module):
    """``a`` feeds both ``b`` and the add; ``double`` adds a conv output to itself."""

    def __init__(self, double: bool = False) -> None:
        super().__init__()
        self.double = double
        self.stem, self.a, self.b = (nn.Conv2d(c, 16, 3, padding=1) for c in (3, 16, 16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(self.stem(x))
        y = self.b(a + a) if self.double else a + self.b(a)
        return self.fc(torch.relu(y).mean((2, 3)))


def test_inductor_placement_drops_the_output_qdq_of_a_conv_only_the_add_reads() -> None:
    # it took the add's first conv: a's output, which b reads too, lost its Q/DQ and no
    # conv + add kernel formed; and y + y lost its only operand's Q/DQ, which failed to compile
    torch.manual_seed(0)
    calib = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    model = _SharedAddInput().eval()
    quantize_(model, PTQConfig(mode="static"), calibration=calib)
    assert place_qdq_(copy.deepcopy(model), "inductor").changes == {
        "b": "output Q/DQ dropped: conv + add (+ ReLU) fuse into one qconv"
    }
    double = _SharedAddInput(double=True).eval()
    quantize_(double, PTQConfig(mode="static"), calibration=calib)
    assert place_qdq_(copy.deepcopy(double), "inductor").changes == {}
    from slimtorch.quant.runtime import cpu_int8_support, int8_kernels

    if cpu_int8_support()["onednn"]:
        assert int8_kernels(model, calib[0][:2]).get("qconv2d_pointwise.binary") == 1
