"""Seeding the process for a run: what seed_everything sets and what it leaves."""

from __future__ import annotations

import torch

from slimtorch.train.seeding import seed_everything


def test_deterministic_seeding_keeps_a_strict_setting_strict() -> None:
    # it lowered the user's use_deterministic_algorithms(True) to warn-only
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())  # fmt: skip
    try:
        torch.use_deterministic_algorithms(True)
        seed_everything(1, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
