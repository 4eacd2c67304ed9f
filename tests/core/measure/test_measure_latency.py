"""Tests of slimtorch.core.measure.latency: counts, statistics, threads, inference mode."""

from __future__ import annotations

import math
import time

import pytest
import torch
from torch import nn

from slimtorch.core.measure import measure_latency
from slimtorch.core.measure.latency import summarize


def test_sleep_20ms_measures_20ms() -> None:
    r = measure_latency(lambda: time.sleep(0.02), warmup=1, repeats=7, min_time_s=0)
    assert r.repeats == 7
    assert r.min_s >= 0.0199  # sleep never returns early
    assert r.median_s < 0.04  # overshoot on a busy machine stays well under another 20 ms
    assert r.p10_s <= r.median_s <= r.p90_s


def test_warmup_and_repeats_are_honoured() -> None:
    calls = []
    r = measure_latency(lambda: calls.append(1), warmup=3, repeats=7, min_time_s=0)
    assert len(calls) == 10 and r.repeats == 7


def test_min_time_extends_repeats(monkeypatch: pytest.MonkeyPatch) -> None:
    # a fake clock: each call takes exactly 2 ms, however loaded the machine is
    import slimtorch.core.measure.latency as latency_mod

    now = [0.0]
    calls = []

    def fn() -> None:
        calls.append(1)
        now[0] += 0.002

    monkeypatch.setattr(latency_mod.time, "perf_counter", lambda: now[0])
    r = measure_latency(fn, warmup=0, repeats=2, min_time_s=0.02)
    assert len(calls) == r.repeats
    assert r.repeats in (10, 11)  # 2 ms each: 20 ms is reached after 10 calls (float rounding: 11)
    assert r.mean_s * r.repeats >= 0.02 - 1e-9


def test_threads_fixed_and_restored() -> None:
    seen = []
    before = torch.get_num_threads()
    r = measure_latency(
        lambda: seen.append(torch.get_num_threads()), repeats=3, min_time_s=0, threads=1
    )
    assert set(seen) == {1} and r.threads == 1
    assert torch.get_num_threads() == before


def test_modules_run_in_inference_mode_functions_do_not() -> None:
    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.modes: list[bool] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.modes.append(torch.is_inference_mode_enabled())
            return self.fc(x)

    probe = Probe()
    r = measure_latency(probe, torch.ones(1, 2), warmup=1, repeats=2, min_time_s=0)
    assert probe.modes == [True, True, True] and r.device == "cpu"
    modes: list[bool] = []
    measure_latency(
        lambda: modes.append(torch.is_inference_mode_enabled()), repeats=2, min_time_s=0
    )
    assert not any(modes)


def test_summarize_by_hand() -> None:
    r = summarize([0.001, 0.002, 0.003, 0.004], "cpu", 2)
    assert r.median_s == pytest.approx(0.0025) and r.mean_s == pytest.approx(0.0025)
    assert r.p10_s == pytest.approx(0.0013) and r.p90_s == pytest.approx(0.0037)
    assert r.std_s == pytest.approx(math.sqrt(5 / 3) * 1e-3)  # sample std, ddof=1
    assert r.min_s == 0.001 and r.repeats == 4
    assert r.spread == pytest.approx((0.0037 - 0.0013) / 0.0025)
    assert r.to_dict()["spread"] == pytest.approx(0.96)
    assert "2.500 ms" in str(r)
    with pytest.raises(ValueError, match="at least one time"):
        summarize([], "cpu", 1)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="repeats must be an int >= 1, got 0"):
        measure_latency(lambda: None, repeats=0)
    with pytest.raises(ValueError, match="warmup must be an int >= 0, got -1"):
        measure_latency(lambda: None, warmup=-1)
    with pytest.raises(ValueError, match="min_time_s must be a number >= 0"):
        measure_latency(lambda: None, min_time_s=-1.0)
    with pytest.raises(TypeError, match="fn_or_model must be callable"):
        measure_latency(3)  # type: ignore[arg-type]


@pytest.mark.gpu
def test_cuda_latency_is_synchronised() -> None:
    a = torch.randn(2048, 2048, device="cuda")
    r = measure_latency(torch.mm, a, a, device="cuda:0", warmup=2, repeats=5, min_time_s=0)
    assert r.device == "cuda:0" and r.repeats == 5
    # a synchronised 2048^3 matmul cannot finish in under a microsecond
    assert r.min_s > 1e-6 and r.median_s < 1.0
    moved = measure_latency(nn.Linear(8, 8).cuda(), torch.ones(2, 8), repeats=2, min_time_s=0)
    assert moved.device.startswith("cuda")
