"""Exact values of DistillationCallback: no features held from evaluation passes, a teacher
sharing the student's parameters refused, and the teacher digest in run_info."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimtorch.distill import DistillationCallback, DistillConfig
from slimtorch.train import Callback, TrainConfig, Trainer


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _data(n: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g)
    return [(x[i : i + size], y[i : i + size]) for i in range(0, n, size)]


def _cfg(**kw: object) -> TrainConfig:
    base = {"epochs": 1, "lr": 0.05, "amp": "off", "progress": False, "momentum": 0.0}
    return TrainConfig(**{**base, **kw})  # type: ignore[arg-type]


class _HeldAfterValidation(Callback):
    def __init__(self, distill: DistillationCallback) -> None:
        self.distill = distill
        self.held: list[dict[str, tuple[int, ...]]] = []

    def on_validation_end(self, trainer: Trainer, metrics: dict[str, object]) -> None:
        # the student hint features the callback still holds (a private dict: memory held)
        self.held.append({k: tuple(v.shape) for k, v in self.distill._student_feats.items()})


def test_evaluation_passes_leave_no_student_features_held() -> None:
    student, teacher = _mlp(0), _mlp(1)
    cb = DistillationCallback(teacher, DistillConfig(hints=(("0", "0"),)))
    probe = _HeldAfterValidation(cb)
    trainer = Trainer(student, _cfg(eval_every_epochs=1), callbacks=[cb, probe])
    trainer.fit(_data(32, 8), _data(1024, 1024))
    assert probe.held == [{}]


def test_a_teacher_sharing_a_student_layer_is_refused() -> None:
    student = _mlp(0)
    teacher = nn.Sequential(student[0], nn.ReLU(), nn.Linear(16, 4))  # reuses the first layer
    w0 = student[0].weight.detach().clone()
    cb = DistillationCallback(teacher, DistillConfig())
    with pytest.raises(ValueError, match="shares parameters"):
        Trainer(student, _cfg(lr=0.1), callbacks=[cb]).fit(_data(32, 8))
    assert student[0].weight.requires_grad
    assert torch.equal(student[0].weight, w0)


def test_run_info_digest_is_count_sum_and_sum_of_squares() -> None:
    t = nn.Linear(2, 1)
    with torch.no_grad():
        t.weight.copy_(torch.tensor([[1.0, -2.0]]))
        t.bias.fill_(3.0)
    # 3 values; 1 - 2 + 3 = 2; 1 + 4 + 9 = 14
    assert DistillationCallback(t, DistillConfig()).run_info()["teacher"] == [3, 2.0, 14.0]
