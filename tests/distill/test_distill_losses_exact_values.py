"""hint_loss treats the teacher's features as constants: no gradient flows into the teacher."""

from __future__ import annotations

import torch

from slimtorch.distill import hint_loss


def test_hint_loss_gives_no_gradient_to_the_teacher_features() -> None:
    torch.manual_seed(0)
    s = torch.randn(2, 3, requires_grad=True)
    t = torch.randn(2, 3, requires_grad=True)
    hint_loss(s, t).backward()
    assert t.grad is None
    # d/ds mean((s - t)^2) = 2 (s - t) / numel
    assert s.grad is not None
    torch.testing.assert_close(s.grad, 2 * (s.detach() - t.detach()) / s.numel())
