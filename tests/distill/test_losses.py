"""kd_loss against hand-computed values, its T^2 scaling and float32 maths; hint_loss shapes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from slimtorch.distill import hint_loss, kd_loss


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def test_kd_loss_two_classes_by_hand() -> None:
    s = torch.zeros(1, 2)
    t = torch.tensor([[math.log(3.0), 0.0]])
    # T = 1: p = (3/4, 1/4), q = (1/2, 1/2)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kd_loss(s, t, temperature=1.0).item() == pytest.approx(expected, rel=1e-6)
    # T = 2: p = softmax(ln3 / 2, 0) = (sqrt3, 1) / (sqrt3 + 1); times T^2 = 4
    r = math.sqrt(3.0)
    p = [r / (r + 1), 1 / (r + 1)]
    assert kd_loss(s, t, temperature=2.0).item() == pytest.approx(4 * _kl(p, [0.5, 0.5]), 1e-6)


def test_kd_loss_is_a_batch_mean_and_zero_for_equal_logits() -> None:
    s = torch.zeros(2, 2)
    t = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    one = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kd_loss(s, t, temperature=1.0).item() == pytest.approx(one / 2, rel=1e-6)
    x = torch.randn(16, 10)
    for temp in (0.5, 1.0, 4.0):
        assert kd_loss(x, x.clone(), temperature=temp).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_scales_by_t_squared_and_keeps_gradients_t_independent() -> None:
    s, t = torch.randn(8, 5), torch.randn(8, 5)
    for temp in (1.0, 3.0, 10.0):
        ref = F.kl_div(F.log_softmax(s / temp, 1), F.softmax(t / temp, 1), reduction="batchmean")
        torch.testing.assert_close(kd_loss(s, t, temperature=temp), ref * temp**2)
    # for T much larger than the logits the gradient tends to (s - t) / (C N) (zero-mean rows):
    # the T^2 factor cancels the 1/T^2 fall-off of the KL gradient (Hinton et al. 2015, 2.1)
    s = s - s.mean(1, keepdim=True)
    t = t - t.mean(1, keepdim=True)
    limit = (s - t) / (5 * 8)
    for temp in (50.0, 200.0):
        sv = s.clone().requires_grad_(True)
        kd_loss(sv, t, temperature=temp).backward()
        assert sv.grad is not None
        torch.testing.assert_close(sv.grad, limit, atol=2e-4, rtol=0.05)


def test_kd_loss_gradient_reaches_the_student_only() -> None:
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3, requires_grad=True)
    kd_loss(s, t, temperature=2.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_kd_loss_runs_in_float32_under_autocast() -> None:
    s = torch.randn(8, 10).bfloat16()
    t = torch.randn(8, 10).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kd_loss(s, t, temperature=4.0)
        hint = hint_loss(s, t)
    assert out.dtype == torch.float32 and hint.dtype == torch.float32
    torch.testing.assert_close(out, kd_loss(s.float(), t.float(), temperature=4.0))


def test_kd_loss_argument_errors() -> None:
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"student logits \(4, 3\) and teacher logits \(4, 5\)"):
        kd_loss(x, torch.randn(4, 5), temperature=1.0)
    with pytest.raises(ValueError, match=r"\(N, C\).*\(4, 3, 2\)"):
        kd_loss(torch.randn(4, 3, 2), torch.randn(4, 3, 2), temperature=1.0)
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        kd_loss(x, x, temperature=0)


def test_hint_loss_is_mse_and_checks_shapes() -> None:
    a, b = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(hint_loss(a, b), ((a - b) ** 2).mean())
    with pytest.raises(ValueError, match=r"student \(2, 4, 3, 3\), teacher \(2, 8, 3, 3\)"):
        hint_loss(a, torch.randn(2, 8, 3, 3))
