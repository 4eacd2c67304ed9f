"""TrainConfig validation: each bad value raises ValueError naming the field."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from slimtorch.train import TrainConfig, seed_everything


@pytest.mark.parametrize(
    ("field", "value", "pattern"),
    [
        ("epochs", 0, r"TrainConfig\.epochs must be in \[1, inf\], got 0"),
        ("epochs", 2.5, r"TrainConfig\.epochs must be an int >= 1"),
        ("optimizer", "adam", r"TrainConfig\.optimizer must be one of 'sgd', 'adamw', got 'adam'"),
        ("lr", 0.0, r"TrainConfig\.lr must be in \(0\.0, inf\]"),
        ("momentum", 1.0, r"TrainConfig\.momentum must be in \[0\.0, 1\.0\)"),
        ("nesterov", 1, r"TrainConfig\.nesterov must be True or False"),
        ("weight_decay", -1e-4, r"TrainConfig\.weight_decay"),
        ("schedule", "step", r"TrainConfig\.schedule must be one of"),
        ("warmup_epochs", 10, r"TrainConfig\.warmup_epochs must be in \[0\.0, 10\)"),
        ("label_smoothing", 1.0, r"TrainConfig\.label_smoothing"),
        ("grad_clip_norm", 0.0, r"TrainConfig\.grad_clip_norm"),
        ("amp", "fp8", r"TrainConfig\.amp must be one of 'off', 'auto', 'bf16', 'fp16'"),
        ("seed", -1, r"TrainConfig\.seed"),
        ("seed", 2**64, r"TrainConfig\.seed must be in \[0, 18446744073709551615\]"),
        ("checkpoint_every_steps", -5, r"TrainConfig\.checkpoint_every_steps"),
        ("eval_every_epochs", -1, r"TrainConfig\.eval_every_epochs"),
        ("log_every_steps", 0, r"TrainConfig\.log_every_steps"),
        ("progress", "yes", r"TrainConfig\.progress must be True or False"),
        ("sync_batchnorm", None, r"TrainConfig\.sync_batchnorm"),
    ],
)
def test_bad_values_name_the_field(field: str, value: Any, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        TrainConfig(**{field: value})


def test_nesterov_needs_momentum() -> None:
    with pytest.raises(ValueError, match="nesterov=True needs momentum > 0"):
        TrainConfig(nesterov=True, momentum=0.0)


def test_round_trip_and_unknown_keys(tmp_path: Any) -> None:
    cfg = TrainConfig(epochs=3, optimizer="adamw", grad_clip_norm=1.0, amp="bf16")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    cfg.save(tmp_path / "c.json")
    assert TrainConfig.load(tmp_path / "c.json") == cfg
    with pytest.raises(ValueError, match="unknown TrainConfig key"):
        TrainConfig.from_dict({"epoch": 3})
    with pytest.raises(TypeError):
        TrainConfig(3)  # type: ignore[misc]  # keyword-only


def test_seed_everything_repeats_streams_and_sets_determinism() -> None:
    import random

    import numpy as np

    seed_everything(5)
    a = (torch.rand(2), random.random(), np.random.rand())
    seed_everything(5)
    assert torch.equal(torch.rand(2), a[0])
    assert (random.random(), np.random.rand()) == (a[1], a[2])
    before = torch.are_deterministic_algorithms_enabled()
    try:
        seed_everything(5, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(before)
        torch.backends.cudnn.deterministic = False
    for bad in (-1, 2**64):
        with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64\)"):
            seed_everything(bad)
    seed_everything(2**64 - 1)  # the largest seed torch takes
