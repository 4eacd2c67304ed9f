from __future__ import annotations

import pytest
import torch
from lowrank_data import randn

from slimtorch.decompose import (
    CPConfig,
    LayerLadder,
    RankOption,
    SVDConfig,
    TTConfig,
    TuckerConfig,
    evbmf,
    parse_rank_spec,
    rank_from_energy,
    rank_from_fraction,
    round_rank,
    select_mode_rank,
    select_ranks_for_budget,
)


def test_fraction_and_rounding() -> None:
    assert rank_from_fraction(64, 0.25) == 16
    assert rank_from_fraction(100, 0.07) == 7  # 0.07 * 100 is 7.000000000000001 in floats
    assert rank_from_fraction(7, 0.01) == 1
    assert round_rank(13, 64, 8) == 16 and round_rank(11, 64, 8) == 8
    assert round_rank(2, 64, 8) == 8  # at least one multiple
    assert round_rank(61, 60, 8) == 60  # clamped to full
    spec = parse_rank_spec(0.2)
    assert select_mode_rank(spec, torch.zeros(40, 9), round_to=8) == 8


def test_energy_threshold_on_a_known_spectrum() -> None:
    s = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.0])  # energies 16, 4, 1, 1 of 22
    assert rank_from_energy(s, 0.7) == 1  # 16/22 = 0.727
    assert rank_from_energy(s, 0.9) == 2  # 20/22 = 0.909
    assert rank_from_energy(s, 0.95) == 3
    assert rank_from_energy(s, 1.0) == 4
    u, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(8, 5, dtype=torch.float64))
    m = u @ torch.diag(s.double()) @ v.mT  # (5, 8) with singular values s
    assert select_mode_rank(parse_rank_spec("energy:0.9"), m) == 2


@pytest.mark.parametrize(("shape", "rank", "noise"), [((40, 60), 5, 0.1), ((64, 288), 12, 0.5)])
def test_evbmf_recovers_the_true_rank(
    gen: torch.Generator, shape: tuple[int, int], rank: int, noise: float
) -> None:
    y = randn(gen, shape[0], rank) @ randn(gen, rank, shape[1])
    result = evbmf(y + noise * randn(gen, *shape))
    assert result.rank == rank
    assert result.sigma2 == pytest.approx(noise**2, rel=0.1)
    assert evbmf(y.mT + noise * randn(gen, shape[1], shape[0])).rank == rank
    assert evbmf(noise * randn(gen, *shape)).rank == 0  # pure noise


def test_evbmf_with_known_noise(gen: torch.Generator) -> None:
    y = randn(gen, 30, 3) @ randn(gen, 3, 50) + 0.05 * randn(gen, 30, 50)
    assert evbmf(y, sigma2=0.05**2).rank == 3
    with pytest.raises(ValueError, match="sigma2 must be a number > 0"):
        evbmf(y, sigma2=0.0)


def test_budget_picks_the_lower_error_option() -> None:
    a = LayerLadder("a", [RankOption((8,), 0.0, 100), RankOption((4,), 0.1, 50)])
    b = LayerLadder("b", [RankOption((8,), 0.0, 100), RankOption((4,), 0.5, 50)])
    sel = select_ranks_for_budget([a, b], target=150)
    assert sel.choices["a"].ranks == (4,) and sel.choices["b"].ranks == (8,)
    assert sel.total_cost == 150 and sel.total_error == pytest.approx(0.1)
    # sensitivity makes a's error count more, so b gives way instead
    a_sensitive = LayerLadder("a", a.options, sensitivity=10.0)
    sel = select_ranks_for_budget([a_sensitive, b], target=150)
    assert sel.choices["b"].ranks == (4,)
    both = select_ranks_for_budget([a, b], target=100)
    assert both.total_cost <= 100


def test_budget_with_flops_and_pluggable_cost() -> None:
    opts = [RankOption((16,), 0.0, 100, flops=1000), RankOption((8,), 0.2, 60, flops=300)]
    c = LayerLadder("c", opts)
    assert select_ranks_for_budget([c], target=500, metric="flops").choices["c"].ranks == (8,)
    latency = {(16,): 2.0, (8,): 1.5}
    pick = select_ranks_for_budget(
        [c], target=1.6, cost_fn=lambda name, o: latency[o.ranks]
    ).choices["c"]
    assert pick.ranks == (8,)
    with pytest.raises(ValueError, match="below the cheapest achievable total 60"):
        select_ranks_for_budget([c], target=10)
    with pytest.raises(ValueError, match="has no flops figure"):
        select_ranks_for_budget(
            [LayerLadder("d", [RankOption((1,), 0.0, 5)])], target=9, metric="flops"
        )


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: TuckerConfig(rank=0), r"TuckerConfig.rank must be >= 1"),
        (lambda: TuckerConfig(rank=1.5), r"TuckerConfig.rank as a fraction must be in \(0, 1\]"),
        (lambda: SVDConfig(rank="energy:2"), r"SVDConfig.rank has an energy threshold"),
        (lambda: SVDConfig(rank="lots"), r"SVDConfig.rank is not a known rank string"),
        (lambda: CPConfig(rank="vbmf"), r"CPConfig.rank uses the 'vbmf' form"),
        (lambda: TTConfig(rank=True), r"TTConfig.rank must not be a bool"),
        (lambda: TuckerConfig(round_to=0), r"TuckerConfig.round_to must be in \[1"),
        (lambda: CPConfig(init="hosvd"), r"CPConfig.init must be one of"),
        (lambda: TTConfig(in_modes=(2, 3)), r"TTConfig.in_modes and TTConfig.out_modes"),
        (lambda: SVDConfig(min_saving=1.0), r"SVDConfig.min_saving must be in \[0.0, 1.0\)"),
    ],
)
def test_bad_config_values_name_the_field(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_configs_round_trip() -> None:
    for cfg in (
        SVDConfig(rank="energy:0.9"),
        TuckerConfig(rank="vbmf", round_to=8),
        CPConfig(rank=16, reg=0.01),
        TTConfig(rank=4, in_modes=(4, 4), out_modes=(2, 8)),
    ):
        assert type(cfg).from_dict(cfg.to_dict()) == cfg
