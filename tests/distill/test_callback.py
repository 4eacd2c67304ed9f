"""DistillationCallback inside the one Trainer: frozen teacher, exact alpha=0, hints, learning."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from slimtorch.distill import DistillationCallback, DistillConfig, hint_loss, kd_loss, load_teacher
from slimtorch.models import create_model, save_model
from slimtorch.train import TrainConfig, Trainer


def _mlp(seed: int, hidden: int = 16) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 4))


def _data(n: int, seed: int, teacher: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    with torch.no_grad():
        y = teacher(x).argmax(1)
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, n, 32)]


def _cfg(epochs: int = 1, **kw: object) -> TrainConfig:
    base = {"lr": 0.05, "amp": "off", "progress": False, "eval_every_epochs": 0, "momentum": 0.0}
    return TrainConfig(epochs=epochs, **{**base, **kw})  # type: ignore[arg-type]


def _mean_kl(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return kd_loss(student(x), teacher(x), temperature=1.0).item()


def test_teacher_is_frozen_and_only_the_student_learns() -> None:
    teacher, student = _mlp(1), _mlp(2)
    before = copy.deepcopy(teacher.state_dict())
    s_before = copy.deepcopy(student.state_dict())
    loader = _data(64, 0, teacher)
    cb = DistillationCallback(teacher, DistillConfig(alpha=0.5))
    trainer = Trainer(student, _cfg(), callbacks=[cb])
    trainer.fit(loader)
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert not teacher.training
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, before[k])
    assert any(not torch.equal(v, s_before[k]) for k, v in student.state_dict().items())
    assert trainer.optimizer is not None
    in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not in_opt & {id(p) for p in teacher.parameters()}
    assert cb.state_dict() == {}


def test_alpha_zero_reproduces_plain_training_exactly() -> None:
    teacher = _mlp(1)
    loader = _data(96, 0, teacher)
    plain, distilled = _mlp(2), _mlp(2)
    Trainer(plain, _cfg(2)).fit(loader)
    cb = DistillationCallback(teacher, DistillConfig(alpha=0.0))
    Trainer(distilled, _cfg(2), callbacks=[cb]).fit(loader)
    other = distilled.state_dict()
    for name, a in plain.state_dict().items():
        assert torch.equal(a, other[name]), name


def test_loss_is_the_weighted_sum_of_hard_soft_and_hint_terms() -> None:
    teacher, student = _mlp(1), _mlp(2)
    cfg = DistillConfig(temperature=2.0, alpha=0.3, hints=(("0", "0"),), hint_weight=0.7)
    cb = DistillationCallback(teacher, cfg)
    trainer = Trainer(student, _cfg())
    cb.on_fit_start(trainer)
    x, y = torch.randn(5, 8), torch.tensor([0, 1, 2, 3, 0])
    out = student(x)
    hard = nn.functional.cross_entropy(out, y)
    total = cb.compute_loss(trainer, x, out, y, hard)
    with torch.no_grad():
        t_out, t_feat = teacher(x), teacher[0](x)
    s_feat = student[0](x)
    expected = 0.7 * hard + 0.3 * kd_loss(out, t_out, temperature=2.0)
    expected = expected + 0.7 * hint_loss(s_feat, t_feat)
    torch.testing.assert_close(total, expected)
    cb.teardown(trainer)
    assert cb._handles == []


def test_distillation_moves_the_student_toward_the_teacher() -> None:
    teacher, student = _mlp(1, hidden=32), _mlp(2)
    loader = _data(512, 0, teacher)
    held_out = torch.randn(256, 8, generator=torch.Generator().manual_seed(9))
    kl_before = _mean_kl(student, teacher, held_out)
    cb = DistillationCallback(teacher, DistillConfig(temperature=2.0, alpha=1.0))
    Trainer(student, _cfg(8, optimizer="adamw", lr=0.01, weight_decay=0.0), callbacks=[cb]).fit(
        loader
    )
    kl_after = _mean_kl(student, teacher, held_out)
    assert kl_after < 0.3 * kl_before, (kl_before, kl_after)


def test_hint_errors_name_the_layers() -> None:
    teacher, student = _mlp(1, hidden=32), _mlp(2)
    loader = _data(32, 0, teacher)
    bad = DistillConfig(hints=(("0", "0"),))
    with pytest.raises(ValueError, match=r"\('0', '0'\).*\(32, 16\).*\(32, 32\)"):
        Trainer(student, _cfg(), callbacks=[DistillationCallback(teacher, bad)]).fit(loader)
    missing = DistillConfig(hints=(("layer9", "0"),))
    with pytest.raises(ValueError, match="'layer9' is not a submodule of the student"):
        Trainer(student, _cfg(), callbacks=[DistillationCallback(teacher, missing)]).fit(loader)


def test_teacher_must_be_independent_and_typed() -> None:
    student = _mlp(2)
    with pytest.raises(ValueError, match="the teacher is the student itself"):
        Trainer(student, _cfg(), callbacks=[DistillationCallback(student, DistillConfig())]).fit(
            _data(32, 0, student)
        )
    with pytest.raises(TypeError, match="config must be a DistillConfig"):
        DistillationCallback(student, {"alpha": 0.5})  # type: ignore[arg-type]


def test_load_teacher_checks_shape_and_classes(tmp_path: Path) -> None:
    net = create_model("mlp", num_classes=10, in_channels=1, input_size=8)
    names = [str(i) for i in range(10)]
    save_model(net, tmp_path / "t", input_shape=(1, 8, 8), mean=[0.5], std=[0.2], class_names=names)
    teacher = load_teacher(tmp_path / "t", input_shape=(1, 8, 8), num_classes=10)
    assert not teacher.training
    with pytest.raises(ValueError, match=r"\(1, 8, 8\), the data is \(3, 32, 32\);.*10 classes"):
        load_teacher(tmp_path / "t", input_shape=(3, 32, 32), num_classes=100)
    # as many classes, other names (another dataset): refused
    with pytest.raises(ValueError, match=r"its classes are \(0, 1, .*the data's are \(a, b"):
        load_teacher(
            tmp_path / "t", input_shape=(1, 8, 8), num_classes=10, classes=list("abcdefghij")
        )


def test_teacher_sees_its_inputs_in_its_own_normalisation(tmp_path: Path) -> None:
    from slimtorch.models import load_model

    net = create_model("mlp", num_classes=10, in_channels=1, input_size=8)
    names = [str(i) for i in range(10)]
    save_model(net, tmp_path / "t", input_shape=(1, 8, 8), mean=[0.5], std=[0.2], class_names=names)
    plain, _ = load_model(tmp_path / "t")
    kw = dict(input_shape=(1, 8, 8), num_classes=10, classes=names)
    same = load_teacher(tmp_path / "t", mean=[0.5], std=[0.2], **kw)  # type: ignore[arg-type]
    assert not same._forward_pre_hooks
    teacher = load_teacher(tmp_path / "t", mean=[0.3], std=[0.4], **kw)  # type: ignore[arg-type]
    raw = torch.rand(4, 1, 8, 8)  # pixels in [0, 1]
    with torch.no_grad():
        got = teacher((raw - 0.3) / 0.4)  # as the student's data is normalised
        want = plain((raw - 0.5) / 0.2)  # as the teacher was trained
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(plain((raw - 0.3) / 0.4), want, atol=1e-3)
        got16 = teacher.half()(((raw - 0.3) / 0.4).half())  # the map follows the input's dtype
    torch.testing.assert_close(got16.float(), want, rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match=r"normalised over 1 channel\(s\), the data over 3"):
        load_teacher(tmp_path / "t", mean=[0.3] * 3, std=[0.4] * 3, **kw)  # type: ignore[arg-type]
