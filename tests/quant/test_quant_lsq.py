"""LSQ fake quantization: forward values, STE and step gradients, initialisation, layers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from slimtorch.quant.lsq import (
    CalibrationError,
    LSQActQuantizer,
    LSQConv2d,
    LSQLinear,
    LSQWeightQuantizer,
    grad_scale,
    lsq_fake_quantize,
    round_ste,
)


def test_grad_scale_and_round_ste() -> None:
    s = torch.tensor(3.0, requires_grad=True)
    y = grad_scale(s, 0.25)
    assert y.item() == 3.0
    y.backward()
    assert s.grad.item() == pytest.approx(0.25)
    x = torch.tensor([0.4, 1.5, -2.6], requires_grad=True)
    r = round_ste(x)
    assert r.tolist() == [0.0, 2.0, -3.0]
    r.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0]


def test_fake_quantize_values_and_gradients_follow_the_paper() -> None:
    # LSQ (Esser et al. 2020, eq. 3): d v_hat / d s = -v/s + round(v/s) inside the range,
    # -Q_N or Q_P when clipped; the gradient w.r.t. v is 1 inside the range, 0 outside.
    qmin, qmax, g = -8, 7, 0.5
    v = torch.tensor([0.26, -0.74, 9.0, -9.0], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    out = lsq_fake_quantize(v, s, qmin, qmax, g)
    assert out.tolist() == [0.5, -0.5, 3.5, -4.0]
    out.sum().backward()
    vs = v.detach() / 0.5
    inside = (vs > qmin) & (vs < qmax)
    expected_s = torch.where(inside, -vs + vs.round(), vs.clamp(qmin, qmax)).sum() * g
    assert s.grad.item() == pytest.approx(expected_s.item(), abs=1e-6)
    assert v.grad.tolist() == inside.float().tolist()


def test_weight_quantizer_init_per_channel() -> None:
    w = torch.randn(6, 3, 3, 3)
    q = LSQWeightQuantizer(w, bits=4)
    expected = 2 * w.abs().reshape(6, -1).mean(1) / math.sqrt(7)
    torch.testing.assert_close(q.step.detach(), expected)
    q8 = LSQWeightQuantizer(w, bits=8, init="minmax")
    torch.testing.assert_close(q8.step.detach(), w.abs().reshape(6, -1).amax(1) / 127)
    wq = q(w)
    levels = wq / q.step.detach().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)
    assert levels.min() >= -8 and levels.max() <= 7
    with pytest.raises(ValueError, match="4 or 8"):
        LSQWeightQuantizer(w, bits=3)


def test_activation_quantizer_picks_sign_and_step_from_first_batch() -> None:
    relu_out = torch.rand(4, 10)
    aq = LSQActQuantizer(bits=8)
    aq(relu_out)
    assert not bool(aq.signed) and bool(aq.initialized)
    assert aq.qrange == (0, 255)
    assert aq.step.item() == pytest.approx(2 * relu_out.abs().mean().item() / math.sqrt(255))
    step = aq.step.item()
    aq(torch.rand(4, 10) * 100)  # later batches do not re-initialise
    assert aq.step.item() == step
    signed = LSQActQuantizer(bits=4)
    signed(torch.randn(4, 10))
    assert bool(signed.signed) and signed.qrange == (-8, 7)


def test_activation_quantizer_rejects_nan_first_batch() -> None:
    aq = LSQActQuantizer(bits=8)
    with pytest.raises(CalibrationError, match="NaN"):
        aq(torch.tensor([[1.0, float("nan")]]))
    assert not bool(aq.initialized)


@pytest.mark.parametrize("act_bits", [8, None])
def test_lsq_layers_compute_float_op_on_fake_quantized_tensors(act_bits: int | None) -> None:
    conv = nn.Conv2d(3, 5, 3, padding=1)
    q = LSQConv2d.from_float(conv, weight_bits=4, act_bits=act_bits)
    assert q.weight is conv.weight and q.bias is conv.bias
    x = torch.rand(2, 3, 6, 6)
    y = q(x)
    xq = x if act_bits is None else q.input_quant(x)
    expected = nn.functional.conv2d(xq, q.weight_quant(conv.weight), conv.bias, padding=1)
    torch.testing.assert_close(y, expected)
    y.square().mean().backward()
    assert q.weight.grad is not None and q.weight_quant.step.grad is not None
    assert torch.isfinite(q.weight_quant.step.grad).all()
    plain = q.to_float()
    assert type(plain) is nn.Conv2d and plain.weight is conv.weight


def test_lsq_linear_state_dict_keys_extend_the_float_ones() -> None:
    lin = nn.Linear(4, 3)
    q = LSQLinear.from_float(lin, weight_bits=8, act_bits=8)
    keys = set(q.state_dict())
    assert set(lin.state_dict()) <= keys
    assert {"weight_quant.step", "input_quant.step", "input_quant.signed"} <= keys
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        LSQLinear.from_float(q)  # already an LSQ layer


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_quantize_and_learn_as_in_float32(dtype: torch.dtype) -> None:
    # under AMP the activations reach the quantizer in half precision: x / s rounded to other
    # levels, and the step's gradient, a sum over the tensor, came out as -4.0 in bf16 and NaN
    # in fp16 against 0.145 in float32
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 256, generator=g) * 3).to(dtype)
    grads, outs = [], []
    for inp in (x.float(), x):
        step = torch.tensor(0.05, requires_grad=True)
        out = lsq_fake_quantize(inp, step, -128, 127, 1.0 / math.sqrt(inp.numel() * 127))
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        assert step.grad is not None and out.dtype == inp.dtype
        grads.append(float(step.grad))
        outs.append(out.float())
    assert grads[1] == pytest.approx(grads[0], rel=1e-2)  # (the incoming gradient is half)
    torch.testing.assert_close(outs[1], outs[0].to(dtype).float())
