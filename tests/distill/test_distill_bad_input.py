"""Bad input to the distillation losses, config, callback and teacher loader: clear errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from slimtorch.distill import DistillationCallback, DistillConfig, hint_loss, kd_loss, load_teacher
from slimtorch.models import create_model, save_model
from slimtorch.train import Callback, TrainConfig, Trainer


def _mlp(seed: int, out: int = 4) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, out))


def _fit(student: nn.Module, teacher: nn.Module, config: DistillConfig) -> list[int]:
    loader = [(torch.randn(16, 8), torch.randint(0, 4, (16,))) for _ in range(2)]
    cfg = TrainConfig(epochs=1, lr=0.05, amp="off", progress=False, eval_every_epochs=0)
    return (
        Trainer(student, cfg, callbacks=[DistillationCallback(teacher, config)]).fit(loader).epoch
    )


@pytest.mark.parametrize("temperature", [math.nan, math.inf, -math.inf])
def test_kd_loss_refuses_a_non_finite_temperature(temperature: float) -> None:
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=rf"temperature must be finite, got {temperature}"):
        kd_loss(x, x + 1, temperature=temperature)


def test_kd_loss_takes_numpy_temperatures_like_floats() -> None:
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    ref = kd_loss(s, t, temperature=2.0)
    for temp in (np.float32(2.0), np.float64(2.0), np.int64(2)):
        torch.testing.assert_close(kd_loss(s, t, temperature=temp), ref)  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [(0, 3), (4, 0)])
def test_kd_loss_refuses_empty_logits(shape: tuple[int, int]) -> None:
    x = torch.randn(*shape)
    with pytest.raises(ValueError, match=rf"kd_loss got empty logits of shape \({shape[0]}, "):
        kd_loss(x, x.clone(), temperature=1.0)


def test_losses_refuse_non_tensors_and_non_float_dtypes() -> None:
    x = torch.randn(4, 3)
    with pytest.raises(TypeError, match=r"teacher logits must be a torch.Tensor, got tuple"):
        kd_loss(x, (x,), temperature=1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"student logits must be a torch.Tensor, got list"):
        kd_loss([[1.0, 2.0]], x, temperature=1.0)  # type: ignore[arg-type]
    one_hot = nn.functional.one_hot(torch.tensor([0, 1, 2, 0]), 3)
    with pytest.raises(TypeError, match=r"teacher logits must be floating point, got torch.int64"):
        kd_loss(x, one_hot, temperature=1.0)
    with pytest.raises(TypeError, match=r"student features must be floating point, got torch.bool"):
        hint_loss(torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 3))
    with pytest.raises(TypeError, match=r"teacher features must be a torch.Tensor, got list"):
        hint_loss(torch.ones(1), [1.0])  # type: ignore[arg-type]


def test_losses_refuse_tensors_on_different_devices() -> None:
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"student logits are on meta, teacher logits on cpu"):
        kd_loss(x.to("meta"), x, temperature=1.0)
    with pytest.raises(ValueError, match=r"student features are on cpu, teacher features on meta"):
        hint_loss(x, x.to("meta"))
    assert kd_loss(x.to("meta"), x.to("meta"), temperature=1.0).shape == ()  # shapes only


def test_hint_loss_refuses_empty_features() -> None:
    with pytest.raises(ValueError, match=r"hint features are empty \(shape \(0, 3\)\)"):
        hint_loss(torch.ones(0, 3), torch.ones(0, 3))


def test_config_refuses_infinite_hint_weight_and_duplicate_pairs() -> None:
    with pytest.raises(ValueError, match=r"DistillConfig.hint_weight must be finite, got inf"):
        DistillConfig(hints=(("0", "0"),), hint_weight=math.inf)
    with pytest.raises(ValueError, match=r"lists the pair \('0', '0'\) twice"):
        DistillConfig(hints=(("0", "0"), ["0", "0"]))  # type: ignore[arg-type]


def test_a_layer_may_serve_in_several_hint_pairs() -> None:
    teacher, student = _mlp(1), _mlp(2)
    cfg = DistillConfig(alpha=0.5, hints=(("0", "0"), ("0", "1"), ("1", "1")), hint_weight=0.5)
    cb = DistillationCallback(teacher, cfg)
    trainer = Trainer(student, TrainConfig(epochs=1, amp="off", progress=False))
    cb.on_fit_start(trainer)
    x, y = torch.randn(5, 8), torch.tensor([0, 1, 2, 3, 0])
    out = student(x)
    hard = nn.functional.cross_entropy(out, y)
    total = cb.compute_loss(trainer, x, out, y, hard)
    assert cb._student_feats == {} and cb._teacher_feats == {}  # nothing kept for the next step
    cb.on_fit_end(trainer)  # the hooks go: the reference features below are not recorded
    with torch.no_grad():
        t0 = teacher[0](x)
        t1 = teacher[1](t0)
        t_out = teacher(x)
    s0 = student[0](x)
    s1 = student[1](s0)
    hints = (hint_loss(s0, t0) + hint_loss(s0, t1) + hint_loss(s1, t1)) / 3
    expected = 0.5 * hard + 0.5 * kd_loss(out, t_out, temperature=4.0) + 0.5 * hints
    torch.testing.assert_close(total, expected)
    assert _fit(_mlp(2), _mlp(1), cfg) == [1]


def test_teacher_with_tuple_output_gets_a_clear_error() -> None:
    class TupleOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
            return (self.fc(x),)

    with pytest.raises(TypeError, match=r"teacher logits must be a torch.Tensor, got tuple"):
        _fit(_mlp(2), TupleOut(), DistillConfig())


def test_teacher_on_the_meta_device_is_refused() -> None:
    with torch.device("meta"):
        teacher = _mlp(1)
    with pytest.raises(
        ValueError, match=r"teacher has 4 tensor\(s\) on the meta device.*'0.weight'"
    ):
        _fit(_mlp(2), teacher, DistillConfig())


@pytest.fixture
def saved_teacher(tmp_path: Path) -> Path:
    net = create_model("mlp", num_classes=10, in_channels=1, input_size=8, hidden=(32,))
    names = [str(i) for i in range(10)]
    save_model(net, tmp_path / "t", input_shape=(1, 8, 8), mean=[0.5], std=[0.5], class_names=names)
    return tmp_path / "t"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"num_classes": "10"}, TypeError, "num_classes must be an int, got '10'"),
        ({"num_classes": True}, TypeError, "num_classes must be an int, got True"),
        ({"num_classes": 10.0}, TypeError, r"num_classes must be an int, got 10\.0"),
        ({"num_classes": 0}, ValueError, "num_classes must be >= 1, got 0"),
        ({"input_shape": (1.9, 8, 8)}, TypeError, r"sequence of ints .* got \(1\.9, 8, 8\)"),
        ({"input_shape": "188"}, TypeError, "sequence of ints .* got '188'"),
        ({"input_shape": 8}, TypeError, "sequence of ints .* got 8"),
        ({"input_shape": (1, 0, 8)}, ValueError, r"positive sizes, got \(1, 0, 8\)"),
    ],
)
def test_load_teacher_checks_its_arguments(
    saved_teacher: Path, kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    args: dict[str, object] = {"input_shape": (1, 8, 8), "num_classes": 10, **kwargs}
    with pytest.raises(error, match=message):
        load_teacher(saved_teacher, **args)  # type: ignore[arg-type]
    teacher = load_teacher(saved_teacher, input_shape=[1, 8, 8], num_classes=np.int64(10))  # type: ignore[arg-type]
    assert not teacher.training


def test_a_low_precision_teacher_gets_its_inputs_in_its_dtype() -> None:
    teacher = _mlp(1).to(torch.bfloat16)
    config = DistillConfig(temperature=2.0, alpha=0.5, hints=(("0", "0"),))
    assert _fit(_mlp(2), teacher, config) == [1]  # fp32 student, bf16 teacher
    assert next(teacher.parameters()).dtype == torch.bfloat16  # left in its dtype


def test_a_teacher_built_for_other_inputs_is_named_and_leaves_no_hooks() -> None:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))  # takes 6, not 8
    student = _mlp(1)
    config = DistillConfig(hints=[("0", "0")], hint_weight=0.1)
    with pytest.raises(RuntimeError, match=r"distillation teacher \(Sequential\) failed on a "
                       r"training batch of shape \(16, 8\)"):  # fmt: skip
        _fit(student, teacher, config)
    # the failed run removed its hint hooks from both models
    assert not student[0]._forward_hooks and not teacher[0]._forward_hooks

    class _Boom(Callback):
        def on_fit_start(self, trainer: Trainer) -> None:
            raise RuntimeError("boom")

    good = _mlp(2)
    cfg = TrainConfig(epochs=1, progress=False)
    loader = [(torch.randn(4, 8), torch.randint(0, 4, (4,)))]
    callbacks = [DistillationCallback(good, config), _Boom()]  # fails after the hooks went on
    with pytest.raises(RuntimeError, match="boom"):
        Trainer(student, cfg, callbacks=callbacks).fit(loader)
    assert not student[0]._forward_hooks and not good[0]._forward_hooks


def test_hint_features_are_taken_before_an_in_place_op_changes_them() -> None:
    # the hook kept a reference; the ReLU(inplace=True) after the layer then overwrote it, so
    # the hint compared relu(student) with relu(teacher) instead of the layers' outputs
    def net(seed: int) -> nn.Sequential:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Linear(16, 4))

    teacher, student = net(1), net(2)
    cb = DistillationCallback(teacher, DistillConfig(alpha=0.0, hints=(("0", "0"),)))
    trainer = Trainer(student, TrainConfig(epochs=1, progress=False))
    cb.on_fit_start(trainer)
    x, y = torch.randn(5, 8), torch.tensor([0, 1, 2, 3, 0])
    out = student(x)
    total = cb.compute_loss(trainer, x, out, y, torch.zeros(()))
    with torch.no_grad():
        want = hint_loss(student[0](x), teacher[0](x))
    torch.testing.assert_close(total.detach(), want)
    cb.teardown(trainer)


@pytest.mark.parametrize(
    ("teacher_dtype", "amp"), [(torch.float16, "bf16"), (torch.bfloat16, "fp16")]
)
def test_a_half_teacher_runs_in_its_own_dtype_under_the_other_amp(
    teacher_dtype: torch.dtype, amp: str
) -> None:
    # autocast to the other half dtype fed the teacher's batch norms inputs of another dtype
    # than their weights, and the error blamed the input shape
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 4))
    teacher.eval().to(teacher_dtype)
    torch.manual_seed(1)
    student = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(144, 4))
    loader = [(torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,))) for _ in range(2)]
    cfg = TrainConfig(epochs=1, lr=0.05, amp=amp, progress=False, eval_every_epochs=0)
    cb = DistillationCallback(teacher, DistillConfig(alpha=0.5))
    history = Trainer(student, cfg, callbacks=[cb]).fit(loader)
    assert math.isfinite(history.train_loss[0])
