"""Optimisers (param groups) and per-iteration schedules against their formulas."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from slimtorch.train import TrainConfig, build_optimizer, build_scheduler, param_groups


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LayerNorm(4))


def test_norm_and_bias_parameters_are_not_decayed() -> None:
    model = _model()
    decay, no_decay = param_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3, 3, 3])]  # conv weight only
    assert len(no_decay["params"]) == 5  # conv bias, BN weight+bias, LN weight+bias
    (everything,) = param_groups(model, 0.01, decay_norm_and_bias=True)
    assert len(everything["params"]) == 6
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(model, 0.01)


def test_build_optimizer_settings() -> None:
    cfg = TrainConfig(optimizer="sgd", lr=0.2, momentum=0.8, nesterov=True, weight_decay=1e-3)
    opt = build_optimizer(_model(), cfg)
    assert isinstance(opt, torch.optim.SGD)
    g = opt.param_groups[0]
    assert (g["lr"], g["momentum"], g["nesterov"], g["weight_decay"]) == (0.2, 0.8, True, 1e-3)
    assert opt.param_groups[1]["weight_decay"] == 0.0
    adamw = build_optimizer(_model(), cfg.replace(optimizer="adamw", nesterov=False))
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.param_groups[0]["weight_decay"] == 1e-3


def _lrs(cfg: TrainConfig, steps_per_epoch: int) -> list[float]:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, steps_per_epoch)
    lrs = []
    for _ in range(cfg.epochs * steps_per_epoch):
        lrs.append(opt.param_groups[0]["lr"])  # the lr used by this step
        opt.step()
        sched.step()
    lrs.append(opt.param_groups[0]["lr"])  # after the last step
    return lrs


def test_cosine_with_linear_warmup_matches_formula() -> None:
    cfg = TrainConfig(epochs=4, lr=0.4, schedule="cosine", warmup_epochs=1.0)
    lrs = _lrs(cfg, 5)  # T = 20 steps, W = 5
    for s in range(5):
        assert lrs[s] == pytest.approx(0.4 * (s + 1) / 5)
    for s in (5, 9, 12, 19, 20):
        assert lrs[s] == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi * (s - 5) / 15)))
    assert lrs[5] == pytest.approx(0.4) and lrs[20] == pytest.approx(0.0, abs=1e-12)


def test_constant_with_warmup_and_without() -> None:
    lrs = _lrs(TrainConfig(epochs=2, lr=0.1, schedule="constant", warmup_epochs=0.5), 4)
    assert lrs[:3] == pytest.approx([0.05, 0.1, 0.1])
    assert lrs[-1] == pytest.approx(0.1)
    assert _lrs(TrainConfig(epochs=1, lr=0.3, schedule="constant"), 3) == pytest.approx([0.3] * 4)


def test_onecycle_peaks_at_warmup_end() -> None:
    # OneCycleLR (cosine annealing): start lr/25, peak lr after W steps, end lr/(25 * 1e4)
    cfg = TrainConfig(epochs=2, lr=0.5, schedule="onecycle", warmup_epochs=0.5, momentum=0.9)
    lrs = _lrs(cfg, 10)  # T = 20, W = 5: OneCycleLR's peak is at step pct_start * T - 1 = 4
    assert lrs[0] == pytest.approx(0.5 / 25)
    assert max(lrs) == pytest.approx(0.5) and lrs.index(max(lrs)) == 4
    initial, final = 0.5 / 25, 0.5 / 25 / 1e4
    # annealing phase: steps 4 .. 19 cosine from 0.5 to final
    for s in (8, 12, 19):
        pct = (s - 4) / (19 - 4)
        assert lrs[s] == pytest.approx(final + (0.5 - final) / 2 * (1 + math.cos(math.pi * pct)))
    # warm-up phase: cosine from initial to the peak
    assert lrs[2] == pytest.approx(0.5 + (initial - 0.5) / 2 * (1 + math.cos(math.pi * 2 / 4)))


def test_scheduler_rejects_empty_epochs() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="steps_per_epoch must be >= 1"):
        build_scheduler(opt, TrainConfig(), 0)
