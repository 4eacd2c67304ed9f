"""Q/DQ modules, quantize_weight/fake_quantize against torch references, save/load round-trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from slimtorch.models import create_model, load_model, save_model
from slimtorch.quant import LayerQParams, QDQConv2d, QDQLinear, quantize_weight, to_qdq_
from slimtorch.quant.convert import ActQParams, QDQAct
from slimtorch.quant.qdq import fake_quantize


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_quantize_weight_matches_torch_per_channel() -> None:
    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    q, scale, zp = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.shape == (6,) and bool((zp == 0).all())
    ref = torch.quantize_per_channel(w, scale.double(), zp, 0, torch.qint8).int_repr()
    torch.testing.assert_close(q, ref.clamp(-127, 127))
    assert int(q.abs().max()) == 127
    q4, _, _ = quantize_weight(w, 4)
    assert int(q4.min()) >= -8 and int(q4.max()) <= 7
    qa, sa, za = quantize_weight(w, per_channel=False, symmetric=False)
    assert qa.dtype == torch.uint8 and sa.shape == () and 0 <= int(za) <= 255
    deq = (qa.float() - za) * sa
    assert float((deq - w).abs().max()) <= float(sa) / 2 + 1e-6


def test_fake_quantize_matches_torch() -> None:
    x = torch.randn(1000) * 3
    ref = torch.fake_quantize_per_tensor_affine(x, 0.05, 10, 0, 255)
    torch.testing.assert_close(fake_quantize(x, 0.05, 10, 0, 255), ref)


def test_qdq_layers_compute_the_reference() -> None:
    torch.manual_seed(0)
    conv, lin = nn.Conv2d(3, 8, 3, padding=1, groups=1), nn.Linear(16, 5)
    x = torch.randn(2, 3, 6, 6)
    qp = LayerQParams(
        weight_scale=quantize_weight(conv.weight)[1],
        input_scale=0.03,
        input_zero_point=120,
        output_scale=0.05,
        output_zero_point=128,
    )
    qconv = QDQConv2d.from_float(conv, qp)
    w_dq = qconv.weight_int8.float() * qconv.weight_scale.reshape(-1, 1, 1, 1)
    y = F.conv2d(fake_quantize(x, 0.03, 120, 0, 255), w_dq, conv.bias, padding=1)
    torch.testing.assert_close(qconv(x), fake_quantize(y, 0.05, 128, 0, 255))
    qlin = QDQLinear.from_float(lin, LayerQParams(weight_scale=quantize_weight(lin.weight)[1]))
    xl = torch.randn(4, 16)
    w_l = qlin.weight_int8.float() * qlin.weight_scale[:, None]
    torch.testing.assert_close(qlin(xl), F.linear(xl, w_l, lin.bias))  # weight-only: float x
    dyn = QDQLinear.from_float(
        lin, LayerQParams(weight_scale=quantize_weight(lin.weight)[1], input_dynamic=True)
    )
    with torch.no_grad():
        assert float((dyn(xl) - lin(xl)).abs().max()) < 0.1
    act = QDQAct(nn.ReLU(), ActQParams(scale=0.1))
    torch.testing.assert_close(
        act(torch.tensor([0.26, -1.0, 30.0])), torch.tensor([0.3, 0.0, 25.5])
    )


def test_to_qdq_validates_before_changing() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))
    good = LayerQParams(weight_scale=torch.full((4,), 0.01))
    bad = LayerQParams(weight_scale=torch.full((3,), 0.01))
    with pytest.raises(ValueError, match=r"'3'.*shape \(2,\)"):
        to_qdq_(net, {"0": good, "3": bad})
    assert type(net[0]) is nn.Conv2d  # nothing replaced
    with pytest.raises(ValueError, match="not a submodule"):
        to_qdq_(net, {"9": good})
    with pytest.raises(TypeError, match=r"only nn\.Conv2d and nn\.Linear"):
        to_qdq_(net, {"1": good})
    with pytest.raises(ValueError, match="input_zero_point"):
        to_qdq_(
            net,
            {
                "0": LayerQParams(
                    weight_scale=torch.full((4,), 0.01), input_scale=0.1, input_zero_point=300
                )
            },
        )
    report = to_qdq_(net, {"0": good})
    assert report.rows[0].bytes_after < report.rows[0].bytes_before
    assert "0" in report.to_table() and report.to_dict()["totals"]["quantized"] == 1


def test_saved_int8_model_reloads_without_calibration(tmp_path) -> None:
    torch.manual_seed(0)
    model = create_model("lenet5").eval()
    qparams = {
        name: LayerQParams(weight_scale=quantize_weight(m.weight)[1],
                           weight_bits=4 if name == "classifier.0" else 8,
                           input_scale=0.05, input_zero_point=3)
        for name, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)
    }  # fmt: skip
    acts = {"features.1": ActQParams(scale=0.04)}
    to_qdq_(model, qparams, activations=acts)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
    save_model(model, tmp_path / "m", input_shape=(1, 28, 28), mean=[0.5], std=[0.5],
               class_names=[str(i) for i in range(10)])  # fmt: skip
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "m" / "model.safetensors")
    int8 = [k for k, t in tensors.items() if t.dtype == torch.int8]
    assert len(int8) == len(qparams) and not any(k.endswith("zero_point") for k in tensors)
    loaded, _ = load_model(tmp_path / "m")
    assert isinstance(loaded.get_submodule("features.1"), QDQAct)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref)


@pytest.mark.parametrize("mode", ["weight_only", "dynamic", "static"])
def test_int8_layers_stay_float32_whatever_the_default_dtype(mode: str) -> None:
    # their scales and bias took the default dtype: under float64 quantize_ reported every
    # layer quantized and the model then failed on its next call
    from slimtorch.models import create_model
    from slimtorch.quant import PTQConfig, quantize_

    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = create_model("lenet5", in_channels=1, input_size=28).float().eval()
        x = torch.randn(4, 1, 28, 28, dtype=torch.float32)
        quantize_(model, PTQConfig(mode=mode), calibration=x if mode == "static" else None)
        out = model(x)
    finally:
        torch.set_default_dtype(old)
    assert out.dtype == torch.float32 and out.shape == (4, 10)
    assert model.fc1.bias.dtype == model.fc1.weight_scale.dtype == torch.float32
