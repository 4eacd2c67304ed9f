"""Exact values at the edges of the verdict, the accuracy guard, the report table and the
side-by-side memory comparison."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from slimtorch.core.measure import profile_model
from slimtorch.pipeline.compress import _guard, compress_run
from slimtorch.pipeline.report_table import report_table
from slimtorch.pipeline.side_by_side import MEMORY_ROUNDS, _memory_side_by_side
from slimtorch.pipeline.verdict import MATERIAL, classify_speed, finish_timings, make_verdict


def test_slower_threshold_is_the_reciprocal_of_the_faster_one() -> None:
    # 1 / 1.03 = 0.97087: 0.9705 is slower, though it lies above 1 - 0.03 = 0.97
    assert MATERIAL == 0.03
    assert classify_speed(0.9705, 0, 9) == "slower"


def test_a_two_percent_smaller_model_is_not_called_smaller() -> None:
    verdict = make_verdict(size_before=100, size_after=98, acc_before=0.9, acc_after=0.9,
                           timings=[])  # fmt: skip
    assert verdict["headline"] == "neither smaller nor faster"


def test_a_speedup_of_exactly_the_material_change_is_faster() -> None:
    assert classify_speed(1 + MATERIAL, 9, 9) == "faster"


def test_rounds_that_tie_are_not_counted_faster() -> None:
    finished = {"sparse_kernels": {"model": {"kept": True, "speedup": 1.2,
                                             "speedup_per_round": [1.0] * 7}}}  # fmt: skip
    (entry,) = finish_timings(finished)
    assert entry["faster_rounds"] == 0 and entry["rounds"] == 7


def test_an_infinite_speedup_is_unchanged() -> None:
    assert classify_speed(float("inf"), 9, 9) == "unchanged"


def test_the_accuracy_guard_passes_a_drop_equal_to_the_limit() -> None:
    assert _guard(0.9, 0.9, 0.0)["passed"] is True


def test_an_accuracy_gain_is_a_negative_drop() -> None:
    guard = _guard(0.9, 0.92, 1.0)
    assert guard is not None and guard["passed"] is True
    assert guard["drop_points"] == pytest.approx(-2.0)


def test_a_nan_max_drop_is_refused_before_loading(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_drop"):
        compress_run(in_dir=tmp_path / "missing", out_dir=None, method="svd",
                     max_drop=float("nan"))  # fmt: skip


def test_the_report_table_signs_an_accuracy_gain_positive() -> None:
    model = nn.Linear(4, 2)
    profile = profile_model(
        model, torch.randn(2, 4), device="cpu", profiles=[], warmup=1, repeats=2, min_time_s=0
    )
    row = report_table(0.90, 0.95, profile, profile).splitlines()[1]
    assert row.startswith("test accuracy (%)")
    assert row.endswith("+5.00p")


def test_memory_ranges_that_touch_overlap(monkeypatch: pytest.MonkeyPatch) -> None:
    # before ranges over [1, 2], after over [2, 3]: they share the value 2
    calls = iter([1, 2, 2, 3, 1, 2, 2, 3, 1, 2])

    class Peak:
        def __init__(self, value: int) -> None:
            self.peak_bytes = value

    monkeypatch.setattr("slimtorch.core.measure.measure_peak_memory",
                        lambda m, x, device=None: Peak(next(calls)))  # fmt: skip
    assert MEMORY_ROUNDS == 5
    res = _memory_side_by_side(nn.Linear(2, 2), nn.Linear(2, 2), (1, 2), torch.device("cpu"))
    assert res["samples"] == {"before": [1, 2, 1, 2, 1], "after": [2, 3, 2, 3, 2]}
    assert res["overlap"] is True
