"""Exact behaviour of core helpers: option kinds in config checks, thread-count restoring."""

from __future__ import annotations

import pytest
import torch

from slimtorch.core.config import check_choice
from slimtorch.core.devices import cpu_threads


@pytest.mark.parametrize("value", [1, 0])
def test_an_int_is_not_a_bool_choice(value: int) -> None:
    # 1 == True and 0 == False, but an int is not the bool option it equals
    with pytest.raises(ValueError, match="must be one of"):
        check_choice("f", "batch_kernels", value, (None, True, False))
    check_choice("f", "batch_kernels", bool(value), (None, True, False))


def test_cpu_threads_restores_the_previous_count() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with cpu_threads(1) as n:
            assert n == torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
