"""Exact values of the decompose package: layer geometry kept through factorisation and
save/load, parameter and FLOP counts, rank rounding, budget bookkeeping and speed checks.

Every expected number is worked out by hand in the test (or by plain torch arithmetic).
"""

from __future__ import annotations

import math
import types

import pytest
import torch
from torch import nn

from slimtorch.decompose import (
    CPConfig,
    LayerLadder,
    RankOption,
    SVDConfig,
    TTConfig,
    TuckerConfig,
    decompose_,
    parse_rank_spec,
    rebuild_decomposed,
    select_mode_rank,
    select_ranks_for_budget,
    tt_svd,
    tucker2,
)
from slimtorch.decompose import speed as speed_module
from slimtorch.decompose import transform as transform_module
from slimtorch.decompose._shapes import layer_flops
from slimtorch.decompose.budget import BudgetSelection
from slimtorch.decompose.budget_mode import (
    BudgetPlan,
    _weights,
    budget_outcome,
    mode_ranks,
    svd_options,
    tucker_options,
)
from slimtorch.decompose.handlers import cp_conv_rank, split_modes, tt_linear
from slimtorch.decompose.linalg import relative_error
from slimtorch.decompose.speed import SpeedCheck, layer_speedup
from slimtorch.decompose.transform import LayerReport
from slimtorch.decompose.tucker import tucker2_to_full


def _tucker_rank_conv(gen: torch.Generator) -> nn.Conv2d:
    """A dilated Conv2d(16, 16, 3) whose kernel has Tucker-2 ranks (8, 8) exactly."""
    conv = nn.Conv2d(16, 16, 3, padding=2, dilation=2)
    core = torch.randn(8, 8, 3, 3, generator=gen)
    u_out = torch.linalg.qr(torch.randn(16, 8, generator=gen)).Q
    u_in = torch.linalg.qr(torch.randn(16, 8, generator=gen)).Q
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("oa,ib,abhw->oihw", u_out, u_in, core))
    return conv


def _smooth_linear() -> nn.Linear:
    """Linear(64, 64) with a Hilbert-like (fast-decaying) weight plus a little noise."""
    i = torch.arange(64.0)
    lin = nn.Linear(64, 64)
    with torch.no_grad():
        lin.weight.copy_(1.0 / (1.0 + i[:, None] + i[None, :]) + 0.01 * torch.sin(i[:, None] * i))
    return lin


# --- geometry: stride and dilation survive factorisation and rebuilding ---------------------


def test_tucker_keeps_a_dilated_convs_output(gen: torch.Generator) -> None:
    net = nn.Sequential(_tucker_rank_conv(gen))
    x = torch.randn(1, 16, 12, 12, generator=gen)
    ref = net(x)  # 12x12: padding 2 makes up for the dilated 5x5 reach
    report = decompose_(net, TuckerConfig(rank=0.5), include=["0"])
    assert report.rows[0].action == "decomposed"
    assert net[0].get_submodule("core").dilation == (2, 2)
    out = net(x)
    assert out.shape == ref.shape == (1, 16, 12, 12)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)  # ranks (8, 8) are exact


def test_cp_keeps_a_dilated_convs_output_shape(gen: torch.Generator) -> None:
    net = nn.Sequential(nn.Conv2d(8, 8, 3, padding=2, dilation=2))
    x = torch.randn(1, 8, 12, 12, generator=gen)
    ref_shape = net(x).shape
    report = decompose_(net, CPConfig(rank=8, require_convergence=False), include=["0"])
    assert report.rows[0].action == "decomposed"
    assert net(x).shape == ref_shape == (1, 8, 12, 12)


def test_svd_keeps_a_strided_1x1_convs_output(gen: torch.Generator) -> None:
    net = nn.Sequential(nn.Conv2d(32, 32, 1, stride=2))
    with torch.no_grad():  # a rank-4 kernel: SVD at rank 4 reproduces it
        a, b = torch.randn(32, 4, generator=gen), torch.randn(4, 32, generator=gen)
        net[0].get_parameter("weight").copy_((a @ b)[:, :, None, None])
    x = torch.randn(1, 32, 12, 12, generator=gen)
    ref = net(x)
    report = decompose_(net, SVDConfig(rank=4), include=["0"])
    assert report.rows[0].action == "decomposed"
    out = net(x)
    assert out.shape == ref.shape == (1, 32, 6, 6)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_a_rebuilt_tucker_layer_keeps_its_dilation() -> None:
    net = nn.Sequential(nn.Conv2d(8, 8, 3, padding=2, dilation=2))
    report = decompose_(net, TuckerConfig(rank=0.5), include=["0"])
    fresh = rebuild_decomposed(
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=2, dilation=2)), report.entry["params"]
    )
    assert fresh[0].core.dilation == (2, 2)
    assert fresh(torch.zeros(1, 8, 12, 12)).shape == (1, 8, 12, 12)


def test_a_rebuilt_cp_layer_keeps_an_asymmetric_stride() -> None:
    conv = nn.Conv2d(8, 8, 3, stride=(1, 2))
    x = torch.zeros(1, 8, 12, 12)
    ref_shape = conv(x).shape  # (12 - 3) // 1 + 1 = 10 rows, (12 - 3) // 2 + 1 = 5 columns
    net = nn.Sequential(conv)
    report = decompose_(net, CPConfig(rank=8, require_convergence=False), include=["0"])
    fresh = rebuild_decomposed(
        nn.Sequential(nn.Conv2d(8, 8, 3, stride=(1, 2))), report.entry["params"]
    )
    assert fresh(x).shape == ref_shape == (1, 8, 10, 5)


# --- parameter counts and the saving gate --------------------------------------------------


def test_full_rank_tucker_is_skipped_because_it_adds_params() -> None:
    # before: 16*16*9 + 16 = 2320; ranks (16, 16): 16*16 + 16*16*9 + 16*16 + 16 = 2832
    net = nn.Sequential(nn.Conv2d(16, 16, 3))
    row = decompose_(net, TuckerConfig(rank=1.0), include=["0"]).rows[0]
    assert row.action == "skipped"
    assert "would not reduce params" in (row.reason or "")
    assert isinstance(net[0], nn.Conv2d)


def test_svd_counts_the_bias_so_an_even_trade_is_skipped() -> None:
    # before: 16 + 4 = 20; rank 2: 2 * (4 + 4) + 4 = 20
    net = nn.Sequential(nn.Linear(4, 4))
    row = decompose_(net, SVDConfig(rank=2), include=["0"]).rows[0]
    assert row.action == "skipped"
    assert isinstance(net[0], nn.Linear)


def test_svd_with_equal_params_is_skipped() -> None:
    # before: 16; rank 2: 2 * (4 + 4) = 16
    net = nn.Sequential(nn.Linear(4, 4, bias=False))
    row = decompose_(net, SVDConfig(rank=2), include=["0"]).rows[0]
    assert row.action == "skipped"


def test_a_saving_exactly_at_min_saving_is_taken() -> None:
    # 64 -> 2 * (8 + 8) = 32: a saving of exactly 0.5
    net = nn.Sequential(nn.Linear(8, 8, bias=False))
    row = decompose_(net, SVDConfig(rank=2, min_saving=0.5), include=["0"]).rows[0]
    assert row.action == "decomposed"
    assert (row.params_before, row.params_after) == (64, 32)


# --- rank choice and rounding ----------------------------------------------------------------


def test_tt_energy_rank_meets_its_error_bound_with_few_ranks() -> None:
    # energy 0.9 keeps 90% of the squared norm: relative error at most sqrt(1 - 0.9)
    f = tt_linear(_smooth_linear(), TTConfig(rank="energy:0.9", n_cores=2), "x")
    assert f.rel_error is not None and f.rel_error <= math.sqrt(0.1)
    assert len(f.ranks) == 1 and f.ranks[0] <= 3


def test_tt_ranks_are_rounded_to_round_to() -> None:
    f = tt_linear(_smooth_linear(), TTConfig(rank=0.3, n_cores=3, round_to=4), "x")
    assert len(f.ranks) == 2
    assert all(r % 4 == 0 for r in f.ranks)


def test_cp_rank_rounds_to_the_nearest_multiple() -> None:
    # 9 / 4 = 2.25 rounds to 2 multiples: 8
    assert cp_conv_rank(nn.Conv2d(16, 16, 3), CPConfig(rank=9, round_to=4)) == 8


def test_split_modes_uses_square_factors() -> None:
    assert split_modes(9, 2) == (3, 3)
    assert split_modes(4, 2) == (2, 2)
    assert split_modes(36, 2) == (6, 6)


def test_one_tucker_iteration_beats_plain_hosvd() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 16, 3, 3, generator=g, dtype=torch.float64)
    err = [float(relative_error(tucker2_to_full(*tucker2(w, (4, 4), n_iter=n)), w)) for n in (0, 1)]
    assert err[1] < err[0]  # a HOOI sweep from the HOSVD start lowers the error


def test_select_mode_rank_rounds_to_round_to() -> None:
    # 0.3 * 40 = 12 -> 12 / 8 = 1.5 rounds up to 2 multiples; 13 / 8 = 1.625 -> 2 multiples
    assert select_mode_rank(parse_rank_spec(0.3), torch.zeros(40, 9), round_to=8) == 16
    assert select_mode_rank(parse_rank_spec(13), torch.zeros(64, 9), round_to=8) == 16


def test_energy_threshold_above_one_is_rejected() -> None:
    with pytest.raises(ValueError, match="energy threshold"):
        parse_rank_spec("energy:1.05")
    assert parse_rank_spec("energy:1.0").value == 1.0


def test_tt_svd_with_zero_eps_keeps_only_nonzero_singular_values() -> None:
    x = torch.zeros(3, 3, dtype=torch.float64)
    x[0, 0] = 1.0  # rank 1: singular values 1, 0, 0
    cores = tt_svd(x, eps=0.0)
    assert [tuple(c.shape) for c in cores] == [(1, 3, 1), (1, 3, 1)]


def test_tt_svd_drops_a_tail_exactly_at_the_error_bound() -> None:
    # singular values 4, 3: dropping the 3 leaves error 3 = 0.6 * ||x|| = 0.6 * 5, within eps
    x = torch.diag(torch.tensor([4.0, 3.0], dtype=torch.float64))
    cores = tt_svd(x, eps=0.6)
    assert [tuple(c.shape) for c in cores] == [(1, 2, 1), (1, 2, 1)]


# --- budget mode -----------------------------------------------------------------------------


def _tied_net() -> nn.Sequential:
    net = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64))
    net[2].weight = net[1].weight  # tied: layers 1 and 2 must stay dense
    return net


def test_a_budget_only_dense_layers_could_meet_is_refused() -> None:
    with pytest.raises(ValueError, match="stays dense"):
        decompose_(_tied_net(), SVDConfig(rank="budget:params=0.5"))


def test_budget_reached_counts_the_layers_kept_dense() -> None:
    report = decompose_(_tied_net(), SVDConfig(rank="budget:params=0.75"))
    rows = {r.name: r for r in report.rows}
    assert rows["1"].params_after == rows["2"].params_after == 64 * 64 + 64
    assert report.budget["reached"] == sum(r.params_after for r in report.rows)


def test_a_harmless_layers_weight_is_a_thousandth_of_the_largest() -> None:
    weights = _weights({"a": 0.0, "b": 1.0, "c": 1000.0}, ["a", "b", "c"])
    assert weights == {"a": 1e-3 * 1000.0, "b": 1.0, "c": 1000.0}


def test_svd_ladder_keeps_a_rank_saving_exactly_min_saving() -> None:
    opts = svd_options(nn.Linear(8, 8, bias=False), SVDConfig(min_saving=0.5), None, 1)
    assert (2,) in [o.ranks for o in opts]  # 2 * (8 + 8) = 32 of 64


def test_tucker_ladder_reaches_the_full_output_rank() -> None:
    # Conv2d(64, 4, 3): the output mode has 4 channels, so rank 4 is full and allowed
    opts = tucker_options(nn.Conv2d(64, 4, 3), TuckerConfig(), None, 1)
    outs = {o.ranks[0] for o in opts if o.ranks}
    assert outs == set(mode_ranks(4))
    assert 4 in outs


def test_a_budget_reached_exactly_is_met() -> None:
    choices = {"x": RankOption((2,), 0.1, 50)}
    plan = BudgetPlan(choices, {}, "params", 100.0, 50.0, BudgetSelection(choices, 50.0, 0.1, 50.0))
    rows = [LayerReport("x", "Linear", "decomposed", ranks=[2], params_before=100, params_after=50)]
    outcome = budget_outcome(plan, rows)
    assert outcome["reached"] == 50.0
    assert outcome["met"] is True


def test_an_infinite_sensitivity_is_refused() -> None:
    a = LayerLadder(
        "a", [RankOption((), 0.0, 100), RankOption((4,), 0.1, 50)], sensitivity=math.inf
    )
    b = LayerLadder("b", [RankOption((), 0.0, 100), RankOption((4,), 0.5, 50)])
    with pytest.raises(ValueError, match="must be a finite number"):
        select_ranks_for_budget([a, b], target=150)


# --- the transform's report and model state --------------------------------------------------


def test_report_totals_sum_params_after() -> None:
    net = nn.Sequential(nn.Linear(64, 64))
    report = decompose_(net, SVDConfig(rank=8))
    totals = report.to_dict()["totals"]
    assert totals["params_before"] == 64 * 64 + 64
    assert totals["params_after"] == 8 * (64 + 64) + 64


def test_flops_are_per_sample() -> None:
    net = nn.Sequential(nn.Linear(64, 64))
    row = decompose_(net, SVDConfig(rank=8), example_input=torch.randn(4, 64)).rows[0]
    assert (row.flops_before, row.flops_after) == (2 * 64 * 64, 2 * 8 * (64 + 64))
    assert layer_flops(nn.Linear(64, 64), ((4, 64), (4, 64)), 4) == 2 * 64 * 64


def test_grouped_conv_flops_use_channels_per_group() -> None:
    # per sample: 2 * c_out * (c_in / groups) * kh * kw * out_h * out_w
    conv = nn.Conv2d(8, 8, 3, groups=4)
    assert layer_flops(conv, ((2, 8, 10, 10), (2, 8, 8, 8)), 2) == 2 * 8 * 2 * 9 * 64


def test_dilated_conv_flops_use_the_dilated_output_size() -> None:
    # a 3x3 kernel at dilation 2 reaches 5x5: 10x10 -> 6x6
    conv = nn.Conv2d(4, 4, 3, dilation=2)
    assert layer_flops(conv, ((1, 4, 10, 10), (1, 4, 6, 6)), 1) == 2 * 4 * 4 * 9 * 36


def test_same_padding_conv_flops_keep_the_input_size() -> None:
    conv = nn.Conv2d(4, 4, 3, padding="same")
    assert layer_flops(conv, ((1, 4, 10, 10), (1, 4, 10, 10)), 1) == 2 * 4 * 4 * 9 * 100


def test_a_model_in_eval_mode_gets_an_eval_mode_replacement() -> None:
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU()).eval()
    decompose_(net, SVDConfig(rank=8), include=["0"])
    assert not isinstance(net[0], nn.Linear)
    assert net[0].training is False
    assert all(not m.training for m in net[0].modules())


def test_rebuild_keeps_a_float64_models_dtype() -> None:
    net = nn.Sequential(nn.Linear(64, 64)).double()
    report = decompose_(net, SVDConfig(rank=8))
    fresh = rebuild_decomposed(nn.Sequential(nn.Linear(64, 64)).double(), report.entry["params"])
    assert {p.dtype for p in fresh.parameters()} == {torch.float64}


def test_a_speedup_equal_to_min_speedup_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake(*args: object, **kwargs: object) -> SpeedCheck:
        return SpeedCheck(1e-3, 1e-3, 1.0, "roofline:fake")

    monkeypatch.setattr(transform_module, "layer_speedup", fake)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU())
    config = SVDConfig(rank=8, min_speedup=1.0)
    row = decompose_(net, config, include=["0"], example_input=torch.randn(2, 64)).rows[0]
    assert row.action == "decomposed"
    assert row.speedup == 1.0


def test_equal_timings_count_as_no_faster_round(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake(module: nn.Module, *args: object, **kwargs: object) -> types.SimpleNamespace:
        return types.SimpleNamespace(median_s=1e-3)

    monkeypatch.setattr(speed_module, "measure_latency", fake)
    check = layer_speedup(nn.Linear(8, 8), nn.Linear(8, 8), (2, 8), repeats=4)
    assert (check.faster_rounds, check.rounds) == (0, 4)
    assert check.speedup == 1.0


def test_a_factorised_layer_taking_no_time_is_infinitely_faster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original = nn.Linear(8, 8)

    def fake(module: nn.Module, *args: object, **kwargs: object) -> types.SimpleNamespace:
        return types.SimpleNamespace(median_s=1e-3 if module is original else 0.0)

    monkeypatch.setattr(speed_module, "measure_latency", fake)
    check = layer_speedup(original, nn.Linear(8, 8), (2, 8), repeats=2)
    assert check.speedup == math.inf
