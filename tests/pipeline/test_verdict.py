"""The compress verdict: faster or slower only when the rounds and the size of the change agree."""

from __future__ import annotations

import pytest

from slimtorch.pipeline.verdict import (
    classify_speed,
    finish_timings,
    make_verdict,
    sign_test_p,
    speed_entry,
)


def test_sign_test_matches_the_binomial_tails() -> None:
    assert sign_test_p(9, 9) == pytest.approx(2 / 512)
    assert sign_test_p(0, 9) == pytest.approx(2 / 512)  # symmetric
    assert sign_test_p(8, 9) == pytest.approx(2 * 10 / 512)
    assert sign_test_p(7, 9) == pytest.approx(2 * 46 / 512)
    assert sign_test_p(3, 6) == 1.0  # capped
    with pytest.raises(ValueError, match="wins <= rounds"):
        sign_test_p(10, 9)
    with pytest.raises(ValueError, match="rounds >= 1"):
        sign_test_p(0, 0)


@pytest.mark.parametrize(
    ("speedup", "wins", "rounds", "expected"),
    [
        (1.05, 9, 9, "faster"),
        (1.05, 8, 9, "faster"),
        (1.05, 7, 9, "unchanged"),  # p = 0.18: the direction could be chance
        (1.02, 9, 9, "unchanged"),  # real but under 3%
        (0.90, 0, 9, "slower"),
        (0.90, 2, 9, "unchanged"),
        (2.3, 7, 7, "faster"),
        (2.3, 6, 7, "unchanged"),  # 7 rounds: only 7 of 7 is clear at p <= 0.1
        (1.2, None, None, "faster"),  # no rounds kept: a 10% move is needed
        (1.05, None, None, "unchanged"),
        (float("nan"), 9, 9, "unchanged"),
        # the rounds lean against the median (bimodal times on a busy machine): not a call
        (0.84, 8, 9, "unchanged"),
        (1.2, 0, 7, "unchanged"),
    ],
)
def test_classify_speed(
    speedup: float, wins: int | None, rounds: int | None, expected: str
) -> None:
    assert classify_speed(speedup, wins, rounds) == expected


def test_headlines() -> None:
    def verdict(size_after: int, *entries: dict) -> dict:
        return make_verdict(
            size_before=1000, size_after=size_after, acc_before=0.9, acc_after=0.89,
            timings=list(entries),
        )  # fmt: skip

    same = speed_entry("cpu batch 32", 1.0, faster_rounds=4, rounds=9)
    fast = speed_entry("cpu batch 32", 1.5, faster_rounds=9, rounds=9)
    slow = speed_entry("cpu batch 32", 0.4, faster_rounds=0, rounds=9)
    assert verdict(500, same)["headline"] == "smaller, not faster"
    assert verdict(500, fast)["headline"] == "smaller and faster"
    assert verdict(500, slow)["headline"] == "smaller, but slower"
    assert verdict(1000, fast)["headline"] == "faster, not smaller"
    assert verdict(1000, same)["headline"] == "neither smaller nor faster"
    assert verdict(1000, slow)["headline"] == "slower"
    # int8 simulated eagerly is slower, but one runtime running int8 kernels is faster
    inductor = speed_entry("inductor", 2.3, faster_rounds=7, rounds=7, note="int8 kernels")
    v = verdict(260, slow, inductor)
    assert v["headline"] == "smaller and faster" and v["faster"]
    assert v["text"] == (
        "verdict: smaller and faster: 0.26x the size, -1.00 points; cpu batch 32: 0.40x speed, "
        "slower (0 of 9 rounds faster); inductor (int8 kernels): 2.30x speed, faster (7 of 7 "
        "rounds faster)"
    )


def test_finish_timings_read_every_kind_of_finishing_measurement() -> None:
    finished = {
        "compiled_latency": {"speedup": 1.3, "rounds": 5, "faster_rounds": 5},
        "runtimes": {
            "inductor": {"speedup": 2.2, "rounds": 7, "faster_rounds": 7, "skipped": None},
            "onnxruntime": {"speedup": None, "skipped": "onnxruntime is not installed"},
        },
        "sparse_kernels": {
            "model": {"kept": True, "speedup": 1.1, "speedup_per_round": [1.2, 0.9, 1.1]}
        },
    }
    got = {t["where"]: t for t in finish_timings(finished)}
    assert set(got) == {"compiled", "inductor", "sparse kernels"}  # skipped runtimes are left out
    assert got["compiled"]["verdict"] == "faster"
    assert got["sparse kernels"]["faster_rounds"] == 2 and got["sparse kernels"]["rounds"] == 3
    assert got["sparse kernels"]["verdict"] == "unchanged"  # 2 of 3 rounds: not clear
    assert finish_timings(None) == [] and finish_timings({}) == []
    # sparse kernels the model does not keep are no timing of the result
    assert finish_timings({"sparse_kernels": {"model": {"kept": False, "speedup": 0.8}}}) == []
