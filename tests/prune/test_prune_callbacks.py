"""MaskCallback keeps masks exact in training; GradualPruning follows the cubic schedule and
resumes from a checkpoint exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from slimtorch.prune import GradualPruning, MagnitudeConfig, MaskCallback, get_mask, prune_
from slimtorch.train import Callback, TrainConfig, Trainer
from train_helpers import Crash, KillAt, ListLoader


def _data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    y = torch.randint(0, 4, (n,), generator=gen)
    x = torch.randn(n, 8, generator=gen) + nn.functional.one_hot(y, 8).float() * 4
    return x, y


X, Y = _data()


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = [nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 4)]
    return nn.Sequential(*layers)


def _config(**kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        epochs=3,
        optimizer="sgd",
        lr=0.1,
        momentum=0.9,
        nesterov=True,
        weight_decay=1e-2,
        schedule="constant",
        amp="off",
        seed=5,
        progress=False,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize(("optimizer", "amp"), [("sgd", "off"), ("adamw", "bf16")])
def test_mask_callback_keeps_pruned_weights_exactly_zero(optimizer: str, amp: str) -> None:
    model = _mlp()
    prune_(model, MagnitudeConfig(sparsity=0.8))
    masks = {n: get_mask(m).clone() for n, m in model.named_modules() if get_mask(m) is not None}  # type: ignore[union-attr]
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(model, _config(optimizer=optimizer, amp=amp), callbacks=[MaskCallback()])
    trainer.fit(ListLoader(X, Y, 8))
    assert trainer.global_step == 24
    for name, mask in masks.items():
        layer = model.get_submodule(name)
        assert torch.equal(get_mask(layer), mask)  # type: ignore[arg-type]
        assert bool((layer.weight[~mask] == 0).all())
        assert int((layer.weight == 0).sum()) == round(0.8 * layer.weight.numel())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_without_mask_callback_momentum_revives_pruned_weights() -> None:
    model = _mlp()
    prune_(model, MagnitudeConfig(sparsity=0.8))
    Trainer(model, _config(epochs=1)).fit(ListLoader(X, Y, 8))
    mask = get_mask(model[0])
    assert mask is not None and bool((model[0].weight[~mask] != 0).any())


def test_cubic_schedule_matches_the_formula() -> None:
    s_i, s_f, t0, dt, n = 0.1, 0.9, 100, 50, 8
    cb = GradualPruning(MagnitudeConfig(sparsity=s_f), t0, t0 + n * dt, dt, initial_sparsity=s_i)
    for t in (100, 150, 275, 300, 450, 500):
        expected = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3
        assert cb.sparsity_at(t) == pytest.approx(expected, abs=1e-12)
    assert cb.sparsity_at(0) == pytest.approx(s_i)
    assert cb.sparsity_at(10_000) == s_f
    steps = [t for t in range(0, 600) if cb.is_pruning_step(t)]
    assert steps == list(range(100, 501, 50))
    values = [cb.sparsity_at(t) for t in steps]
    assert values == sorted(values)  # non-decreasing


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"start_step": -1}, "start_step"),
        ({"end_step": 3}, "end_step must be an integer >= 5"),
        ({"frequency": 0}, "frequency"),
        ({"initial_sparsity": 0.95}, "initial_sparsity"),
    ],
)
def test_gradual_pruning_argument_errors(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"start_step": 5, "end_step": 10, "frequency": 1}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        GradualPruning(MagnitudeConfig(sparsity=0.9), **args)


def _gradual() -> GradualPruning:
    return GradualPruning(MagnitudeConfig(sparsity=0.75), start_step=2, end_step=14, frequency=4)


def test_gradual_pruning_raises_sparsity_on_schedule_during_training() -> None:
    model = _mlp()
    gradual = _gradual()

    class _Spy(Callback):
        def __init__(self) -> None:
            self.seen: list[tuple[int, float]] = []

        def on_train_batch_end(self, trainer: Trainer, outputs: Any, loss: Any, idx: int) -> None:
            w = model[0].weight
            self.seen.append((trainer.global_step, float((w == 0).float().mean())))

    spy = _Spy()
    Trainer(model, _config(), callbacks=[gradual, spy]).fit(ListLoader(X, Y, 8))
    assert [t for t, _ in gradual.history] == [2, 6, 10, 14]
    for t, s in gradual.history:
        assert s == pytest.approx(gradual.sparsity_at(t))
    zeros = dict(spy.seen)
    for t, s in gradual.history:  # the layer's sparsity right after pruning step t
        assert zeros[t + 1] == pytest.approx(round(s * 256) / 256)
    for layer in (model[0], model[2], model[4]):
        assert int((layer.weight == 0).sum()) == round(0.75 * layer.weight.numel())


def test_gradual_pruning_state_survives_checkpoint_and_resume(tmp_path: Path) -> None:
    cfg = _config(checkpoint_every_steps=4)
    ref_cb = _gradual()
    ref = Trainer(_mlp(), cfg, callbacks=[ref_cb], out_dir=tmp_path / "ref")
    ref.fit(ListLoader(X, Y, 8))

    with pytest.raises(Crash):
        first = _gradual()
        Trainer(_mlp(), cfg, callbacks=[first, KillAt(12)], out_dir=tmp_path / "run").fit(
            ListLoader(X, Y, 8)
        )
    assert [t for t, _ in first.history] == [2, 6, 10]

    fresh = _mlp(seed=99)
    prune_(fresh, MagnitudeConfig(sparsity=0.0))  # the mask buffers the checkpoint holds
    resumed_cb = _gradual()
    resumed = Trainer(fresh, cfg, callbacks=[resumed_cb], out_dir=tmp_path / "run")
    resumed.fit(ListLoader(X, Y, 8), resume=True)
    assert resumed.global_step == ref.global_step == 24
    assert resumed_cb.history == ref_cb.history
    assert resumed_cb.last_step == 14 and resumed_cb.sparsity == pytest.approx(0.75)
    ref_sd, res_sd = ref.model.state_dict(), resumed.model.state_dict()
    assert ref_sd.keys() == res_sd.keys()
    for key in ref_sd:
        torch.testing.assert_close(res_sd[key], ref_sd[key], rtol=0, atol=0)


def test_gradual_pruning_resumes_a_fresh_model_without_preparing_masks(tmp_path: Path) -> None:
    cfg = _config(checkpoint_every_steps=4)
    ref = Trainer(_mlp(), cfg, callbacks=[_gradual()], out_dir=tmp_path / "ref")
    ref.fit(ListLoader(X, Y, 8))
    with pytest.raises(Crash):
        Trainer(_mlp(), cfg, callbacks=[_gradual(), KillAt(12)], out_dir=tmp_path / "run").fit(
            ListLoader(X, Y, 8)
        )
    resumed = Trainer(_mlp(seed=99), cfg, callbacks=[_gradual()], out_dir=tmp_path / "run")
    resumed.fit(ListLoader(X, Y, 8), resume=True)  # setup adds the buffers the checkpoint holds
    ref_sd, res_sd = ref.model.state_dict(), resumed.model.state_dict()
    assert ref_sd.keys() == res_sd.keys()
    for key in ref_sd:
        torch.testing.assert_close(res_sd[key], ref_sd[key], rtol=0, atol=0)


def test_gradual_pruning_past_the_end_of_the_run_raises_before_touching_the_model() -> None:
    model = _mlp()
    late = GradualPruning(MagnitudeConfig(sparsity=0.75), start_step=0, end_step=24, frequency=4)
    with pytest.raises(
        ValueError,
        match=r"GradualPruning.end_step=24 is never reached: the run has 24 optimiser steps "
        r"\(0 to 23\), so the final sparsity 0.75 would not be applied",
    ):
        Trainer(model, _config(), callbacks=[late]).fit(ListLoader(X, Y, 8))
    assert get_mask(model[0]) is None


def test_a_run_stopped_before_end_step_warns_that_the_target_was_missed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class _StopAt(Callback):
        def on_train_batch_end(self, trainer: Trainer, outputs: Any, loss: Any, idx: int) -> None:
            trainer.should_stop = trainer.global_step >= 4

    gradual = _gradual()
    with caplog.at_level("WARNING", logger="slimtorch.prune.callbacks"):
        Trainer(_mlp(), _config(), callbacks=[gradual, _StopAt()]).fit(ListLoader(X, Y, 8))
    assert gradual.sparsity < 0.75
    assert "short of its target 0.7500 (end_step 14 was not reached)" in caplog.text
