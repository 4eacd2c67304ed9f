"""decompose_ keeps a factorised layer only where it is faster: measured or on a device profile."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slimtorch.core.profiles import DeviceProfile, list_profiles, register_profile
from slimtorch.decompose import (
    CPConfig,
    SVDConfig,
    TuckerConfig,
    TuckerConv2d,
    decompose_,
    layer_speedup,
)

LAUNCH_HEAVY = "test-decompose-speed-launch-heavy"
SLOW_ALU = "test-decompose-speed-slow-alu"


def _profile(name: str, *, peak: float, bandwidth: float, overhead: float) -> None:
    if name in list_profiles():
        return
    register_profile(
        DeviceProfile(
            name=name,
            description=f"test profile {name}",
            peak_flops=dict.fromkeys(("fp32", "fp16", "bf16", "int8"), peak),
            memory_bandwidth=bandwidth,
            memory_bytes=2**30,
            launch_overhead_s=overhead,
            source="test",
        )
    )


@pytest.fixture(scope="module", autouse=True)
def profiles() -> None:
    # Every kernel costs 1 ms, arithmetic and memory are free: time = kernels x 1 ms.
    _profile(LAUNCH_HEAVY, peak=1e18, bandwidth=1e18, overhead=1e-3)
    # No launch cost, fast memory, slow arithmetic: time = FLOPs / 1 GFLOP/s.
    _profile(SLOW_ALU, peak=1e9, bandwidth=1e18, overhead=0.0)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(1))


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))


def test_huge_min_speedup_skips_every_layer_and_keeps_outputs() -> None:
    torch.manual_seed(0)
    net = ConvNet().eval()
    ref = net(X)
    config = TuckerConfig(rank=0.5, min_speedup=1e9)
    report = decompose_(net, config, include=["c1", "c2"], example_input=X)
    assert [r.action for r in report.rows] == ["skipped", "skipped"]
    for row in report.rows:
        assert row.reason is not None and row.reason.startswith("not faster")
        assert "min_speedup 1000000000.0" in row.reason
        assert row.latency_before_s is not None and row.latency_before_s > 0
        assert row.latency_after_s is not None and row.latency_after_s > 0
        assert row.speedup == pytest.approx(row.latency_before_s / row.latency_after_s)
        assert row.speed_source == "measured:cpu"
        assert row.params_after == row.params_before
        assert row.info["tried_ranks"]
    assert isinstance(net.c1, nn.Conv2d) and isinstance(net.c2, nn.Conv2d)
    assert report.entry is None
    torch.testing.assert_close(net(X), ref, rtol=0, atol=0)
    assert "speedup" in report.to_table()
    assert report.to_dict()["layers"][0]["speed_source"] == "measured:cpu"


def test_launch_overhead_profile_rejects_and_slow_alu_profile_accepts() -> None:
    # 64 -> 64 channels, 3x3 on 16x16, Tucker ranks (16, 16).
    # Launch-heavy: dense = 1 kernel = 1 ms; Tucker = 3 kernels = 3 ms -> speed-up 1/3 < 1.
    # Slow ALU: dense = 2*64*64*9*256 = 18.9 MFLOP; Tucker = 2*256*(64*16 + 16*16*9 + 16*64)
    # = 2.2 MFLOP -> speed-up ~8.5 >= 4.
    torch.manual_seed(1)
    x = torch.randn(1, 64, 16, 16)
    heavy = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1))
    slow = copy.deepcopy(heavy)
    cfg = TuckerConfig(rank=0.25, min_speedup=1.0, speed_on=LAUNCH_HEAVY)
    row = decompose_(heavy, cfg, example_input=x).rows[0]
    assert row.action == "skipped" and "not faster" in (row.reason or "")
    assert row.speedup == pytest.approx(1 / 3, rel=1e-3)
    assert row.latency_before_s == pytest.approx(1e-3, rel=1e-3)
    assert row.speed_source == f"roofline:{LAUNCH_HEAVY}"
    assert isinstance(heavy[0], nn.Conv2d)

    cfg = TuckerConfig(rank=0.25, min_speedup=4.0, speed_on=SLOW_ALU)
    row = decompose_(slow, cfg, example_input=x).rows[0]
    assert row.action == "decomposed", row.reason
    assert row.speedup == pytest.approx(18874368 / 2228224, rel=0.02)
    assert row.ranks == [16, 16]
    assert isinstance(slow[0], TuckerConv2d)


def test_speed_batch_sets_the_timed_shape() -> None:
    net = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1))
    x = torch.randn(1, 32, 8, 8)
    cfg = TuckerConfig(rank=0.25, min_speedup=1e9, speed_on=SLOW_ALU, speed_batch=4)
    row = decompose_(net, cfg, example_input=x).rows[0]
    assert "at input (4, 32, 8, 8)" in (row.reason or "")
    one = decompose_(
        nn.Sequential(copy.deepcopy(net[0])), cfg.replace(speed_batch=None), example_input=x
    ).rows[0]
    assert row.latency_before_s == pytest.approx(4 * (one.latency_before_s or 0), rel=1e-6)


def test_layer_speedup_interleaves_and_checks_arguments() -> None:
    lin = nn.Linear(16, 16)
    check = layer_speedup(lin, lin, (4, 16), repeats=3, calls=1, warmup=0, threads=1)
    assert check.source == "measured:cpu" and check.original_s > 0 and check.factorised_s > 0
    est = layer_speedup(lin, nn.Sequential(lin, nn.Identity()), [4, 16], speed_on=LAUNCH_HEAVY)
    assert est.speedup == pytest.approx(1.0)
    with pytest.raises(ValueError, match="input_shape must be a non-empty tuple"):
        layer_speedup(lin, lin, (4, 0))
    with pytest.raises(ValueError, match="repeats must be an int >= 1, got 0"):
        layer_speedup(lin, lin, (4, 16), repeats=0)
    with pytest.raises(ValueError, match="speed_on must be 'measured' or a registered profile"):
        layer_speedup(lin, lin, (4, 16), speed_on="no-such-gpu")
    with pytest.raises(TypeError, match=r"factorised must be an nn\.Module"):
        layer_speedup(lin, "lin", (4, 16))  # type: ignore[arg-type]


def test_min_speedup_needs_example_input() -> None:
    with pytest.raises(ValueError, match=r"TuckerConfig.min_speedup=1.1 needs example_input"):
        decompose_(ConvNet(), TuckerConfig(min_speedup=1.1))


def test_config_round_trip(tmp_path) -> None:
    cfg = TuckerConfig(
        rank="budget:params=0.33", min_speedup=1.2, speed_on="rx580", speed_batch=8, round_to=4
    )
    assert TuckerConfig.from_dict(cfg.to_dict()) == cfg
    cfg.save(tmp_path / "config.json")
    assert TuckerConfig.load(tmp_path / "config.json") == cfg
    plain = SVDConfig()
    assert (plain.min_speedup, plain.speed_on, plain.speed_batch) == (None, "measured", None)
    assert SVDConfig.from_dict(plain.to_dict()) == plain
    assert TuckerConfig(speed_on=SLOW_ALU).speed_on == SLOW_ALU


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: TuckerConfig(min_speedup=0), r"TuckerConfig.min_speedup must be in \(0.0, inf\]"),
        (lambda: SVDConfig(min_speedup=-1.0), r"SVDConfig.min_speedup must be in \(0.0"),
        (lambda: SVDConfig(min_speedup=float("inf")), r"SVDConfig.min_speedup must be finite"),
        (lambda: TuckerConfig(min_speedup=True), r"TuckerConfig.min_speedup must be a number"),
        (lambda: TuckerConfig(speed_on="gtx9090"), r"TuckerConfig.speed_on must be 'measured' or"),
        (lambda: TuckerConfig(speed_on=""), r"TuckerConfig.speed_on must be 'measured' or"),
        (lambda: SVDConfig(speed_batch=0), r"SVDConfig.speed_batch must be in \[1"),
        (lambda: SVDConfig(speed_batch=2.0), r"SVDConfig.speed_batch must be an int >= 1"),
        (lambda: SVDConfig(rank="budget:bytes=0.5"), r"SVDConfig.rank has a budget metric 'bytes'"),
        (lambda: SVDConfig(rank="budget:params=1.5"), r"SVDConfig.rank has a budget fraction"),
        (lambda: SVDConfig(rank="budget:params=x"), r"SVDConfig.rank has a malformed budget"),
        (lambda: CPConfig(rank="budget:params=0.5"), r"CPConfig.rank uses the 'budget' form"),
    ],
)
def test_config_errors_name_the_field(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


MIXED = "test-decompose-speed-mixed"


def test_several_speed_batches_keep_a_layer_only_if_faster_at_all_of_them() -> None:
    """Slow ALU (1 GFLOP/s) plus 50 ms per kernel: a 64->64 3x3 conv on 16x16 maps costs
    18.9 MFLOP per sample dense (1 kernel) and ~2.2 MFLOP factorised at ranks (16, 16) (3
    kernels). Batch 1: 0.069 s dense vs ~0.152 s factorised (slower). Batch 64: 1.26 s vs
    ~0.29 s (about 4x faster). So speed_batch=64 keeps it, (1, 64) keeps it dense."""
    _profile(MIXED, peak=1e9, bandwidth=1e18, overhead=0.05)
    x = torch.randn(1, 64, 16, 16)
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1))
    cfg = TuckerConfig(rank=0.25, min_speedup=1.5, speed_on=MIXED, speed_batch=64)
    big = decompose_(copy.deepcopy(conv), cfg, example_input=x).rows[0]
    assert big.action == "decomposed" and big.speedup == pytest.approx(4.3, rel=0.1)
    both = decompose_(copy.deepcopy(conv), cfg.replace(speed_batch=[1, 64]), example_input=x)
    row = both.rows[0]
    assert row.action == "skipped" and "at input (1, 64, 16, 16)" in (row.reason or "")
    assert row.speedup == pytest.approx(0.45, rel=0.1)
    assert TuckerConfig.from_dict(cfg.replace(speed_batch=[1, 64]).to_dict()).speed_batch == (1, 64)
    with pytest.raises(ValueError, match="speed_batch must not be empty"):
        TuckerConfig(speed_batch=())
