"""Exact values of sparse init scaling, the DST schedule and skips, drop/grow counts and the
sparsify_ decisions (with the timings replaced by fixed numbers)."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

import slimtorch.sparse.sparsify as sparsify_module
from slimtorch.prune import MagnitudeConfig, get_mask, prune_
from slimtorch.sparse import RigL, SparseTrainingConfig, StaticSparse
from slimtorch.sparse.distribution import scale_to_active_fan_in_
from slimtorch.sparse.updates import cosine_drop_fraction, drop_and_grow, drop_count
from slimtorch.train import Callback, TrainConfig, Trainer


def _batches(n: int, features: int = 8, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n * size, features, generator=gen)
    y = torch.randint(0, 4, (n * size,), generator=gen)
    return [(x[i : i + size], y[i : i + size]) for i in range(0, n * size, size)]


def _config(**kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(epochs=1, lr=0.05, amp="off", seed=5, progress=False)
    return TrainConfig(**{**base, **kw})


# ------------------------------------------------------------------ init scaling


def test_init_scaling_leaves_units_without_active_weights_at_zero() -> None:
    w = torch.ones(2, 4)
    mask = torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0]]).bool()
    w.masked_fill_(~mask, 0.0)
    scale_to_active_fan_in_(w, mask)
    r2 = math.sqrt(4 / 2)
    assert w.tolist() == [[0.0, 0.0, 0.0, 0.0], [pytest.approx(r2), pytest.approx(r2), 0.0, 0.0]]


def test_very_sparse_static_init_scales_each_row_without_nan() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64))
    w0 = net[0].weight.detach().clone()
    StaticSparse(SparseTrainingConfig(sparsity=0.99, distribution="uniform")).init_masks_(net)
    mask = get_mask(net[0])
    assert mask is not None and int(mask.sum()) == round(0.01 * 4096)  # 41: most rows empty
    active = mask.sum(1)
    assert int((active == 0).sum()) > 0
    want = torch.zeros(64, 64)
    for r in range(64):
        if active[r] > 0:  # sqrt(fan_in / active fan_in)
            want[r] = torch.where(mask[r], w0[r] * math.sqrt(64 / int(active[r])), 0.0)
    assert not torch.isnan(net[0].weight).any()
    torch.testing.assert_close(net[0].weight.detach(), want)


# ------------------------------------------------------------------ schedule and skips


def test_total_steps_sets_the_update_horizon_instead_of_the_trainer_length() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
    cfg = SparseTrainingConfig(sparsity=0.5, distribution="uniform", delta_t=5, alpha=0.3)
    cb = RigL(cfg, total_steps=100)
    Trainer(model, _config(), callbacks=[cb]).fit(_batches(10))
    assert cb.step_end == 75  # t_end 0.75 of 100, not of the 10 steps run
    assert [u["step"] for u in cb.updates] == [5]
    assert cb.updates[0]["fraction"] == pytest.approx(0.3 / 2 * (1 + math.cos(math.pi * 5 / 75)))


class _Scaler:
    def __init__(self) -> None:
        self.value = 1024.0

    def get_scale(self) -> float:
        return self.value


def test_a_step_the_grad_scaler_skipped_skips_the_mask_update() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16))
    cfg = SparseTrainingConfig(sparsity=0.5, distribution="uniform", delta_t=10, alpha=0.3)
    cb = RigL(cfg, total_steps=100)
    cb.init_masks_(net)
    cb.step_end = 75
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    scaler = _Scaler()
    trainer = SimpleNamespace(
        global_step=10, scaler=scaler, unwrapped_model=net, optimizer=opt, model=net
    )
    before = net[0].weight_mask.clone()
    net(torch.randn(4, 16)).sum().backward()
    cb.on_before_optimizer_step(trainer, opt)  # type: ignore[arg-type]
    scaler.value = 512.0  # the scaler found inf/NaN, skipped the step and halved its scale
    cb.on_after_optimizer_step(trainer)  # type: ignore[arg-type]
    assert cb.skipped_updates == [10]
    assert cb.updates == []
    assert torch.equal(net[0].weight_mask, before)


class _InfGradAt(Callback):
    """An inf gradient at one pruned weight of layer 0 at ``step``; records the masks then."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.masks: dict[str, torch.Tensor] = {}

    def on_after_backward(self, trainer: Trainer) -> None:
        if trainer.global_step != self.step:
            return
        model = trainer.unwrapped_model
        self.masks = {n: get_mask(model.get_submodule(n)).clone() for n in ("0", "2")}  # type: ignore[union-attr]
        grad = model[0].weight.grad
        row, col = (~self.masks["0"]).nonzero()[0].tolist()
        grad[row, col] = float("inf")


def test_a_non_finite_gradient_skips_the_mask_update() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    cfg = SparseTrainingConfig(sparsity=0.5, distribution="uniform", delta_t=10, alpha=0.3)
    cb = RigL(cfg)
    inf = _InfGradAt(10)
    Trainer(model, _config(), callbacks=[inf, cb]).fit(_batches(20, features=16))
    assert cb.step_end == 15  # so step 10 is the only update step
    assert cb.skipped_updates == [10]
    assert cb.updates == []
    for name, mask in inf.masks.items():
        assert torch.equal(get_mask(model.get_submodule(name)), mask)  # type: ignore[arg-type]
    assert torch.isfinite(model[0].weight).all()


def test_masks_narrowed_after_init_are_refused_at_fit_start() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
    cb = RigL(SparseTrainingConfig(sparsity=0.5, distribution="uniform", delta_t=2))
    assert cb.init_masks_(model) == {"0": 128, "2": 64}
    prune_(model, MagnitudeConfig(sparsity=0.8))  # 256 * 0.2 = 51 left in layer 0
    with pytest.raises(
        ValueError, match="'0' should hold 128 active weights but its mask holds 51"
    ):
        Trainer(model, _config(), callbacks=[cb]).fit(_batches(4))


# ------------------------------------------------------------------ drop / grow


def test_drop_count_is_not_lowered_by_float_rounding() -> None:
    assert 0.57 * 100 < 57  # 56.99999999999999
    assert drop_count(100, 0.57) == 57
    # alpha/2 (1 + cos(2 pi / 3)) = 0.1 / 4 = 0.025 of 1000
    assert drop_count(1000, cosine_drop_fraction(100, 0.1, 150)) == 25


def test_a_nearly_dense_mask_still_swaps_n_weights() -> None:
    w = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.0])
    mask = torch.tensor([True] * 9 + [False])
    grow = torch.tensor([1.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 10.0])
    # drop 0.1, 0.2, 0.3 (indices 0-2); grow the best 3 of the then inactive 0, 1, 2, 9
    new = drop_and_grow(w, mask, grow, 3)
    assert new.int().tolist() == [1, 0, 1, 1, 1, 1, 1, 1, 1, 1]


# ------------------------------------------------------------------ sparsify_ (fixed timings)


def _fixed_timings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dense layer 1.0 s, any sparse kernel 0.5 s; the whole model 1.0 s dense, 2.0 s sparse
    (the calls alternate dense, sparse)."""
    calls = {"model": 0}

    def fake(fn: Any, x: Any = None, **kw: Any) -> SimpleNamespace:
        if isinstance(fn, nn.Linear):
            return SimpleNamespace(median_s=1.0)
        if isinstance(fn, nn.Module):
            return SimpleNamespace(median_s=0.5)
        calls["model"] += 1
        return SimpleNamespace(median_s=1.0 if calls["model"] % 2 else 2.0)

    monkeypatch.setattr(sparsify_module, "measure_latency", fake)


def _pruned_linear() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64))
    prune_(net, MagnitudeConfig(sparsity=0.9))
    return net


def test_swaps_that_slow_the_whole_model_are_undone(monkeypatch: pytest.MonkeyPatch) -> None:
    _fixed_timings(monkeypatch)
    net = _pruned_linear()
    report = sparsify_module.sparsify_(net, torch.randn(8, 64), formats=["csr"], min_time_s=0.0)
    assert report.rows[0].candidates[0].speedup == pytest.approx(2.0)  # alone: 1.0 / 0.5
    assert report.model is not None
    assert report.model["speedup"] == pytest.approx(0.5)  # in the model: 1.0 / 2.0
    assert report.model["kept"] is False
    assert report.rows[0].action == "dense"
    assert type(net[0]) is nn.Linear


class _Off(nn.Module):
    """A sparse kernel whose outputs are off by 5e-4 (the float32 tolerance is 1e-4)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.fmt = layer.fmt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x) + 5e-4


def test_a_kernel_with_other_outputs_is_never_swapped_in(monkeypatch: pytest.MonkeyPatch) -> None:
    _fixed_timings(monkeypatch)
    real = sparsify_module.build_sparse_layer
    monkeypatch.setattr(sparsify_module, "build_sparse_layer", lambda m, f: _Off(real(m, f)))
    net = _pruned_linear()
    report = sparsify_module.sparsify_(
        net, torch.randn(8, 64), formats=["csr"], min_time_s=0.0, check_model=False
    )
    cand = report.rows[0].candidates[0]
    assert cand.status == "mismatch"
    assert cand.max_abs_err == pytest.approx(5e-4, rel=1e-2)
    assert report.rows[0].action == "dense"
    assert type(net[0]) is nn.Linear
