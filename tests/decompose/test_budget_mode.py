"""Budget mode of decompose_ (rank='budget:...') and measure_sensitivity."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimtorch.decompose import (
    SVDConfig,
    TuckerConfig,
    TuckerConv2d,
    decompose_,
    measure_sensitivity,
    plan_budget,
)
from slimtorch.decompose.budget_mode import svd_options, tucker_options


def low_rank_kernel(c_out: int, c_in: int, rank: int, gen: torch.Generator) -> torch.Tensor:
    core = torch.randn(rank, rank, 3, 3, generator=gen)
    u_out = torch.linalg.qr(torch.randn(c_out, rank, generator=gen)).Q
    u_in = torch.linalg.qr(torch.randn(c_in, rank, generator=gen)).Q
    return torch.einsum("abhw,oa,ib->oihw", core, u_out, u_in)  # (C_out, C_in, 3, 3)


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(8, 32, 3, padding=1)
        self.c2 = nn.Conv2d(32, 32, 3, padding=1)
        self.c3 = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.c4 = nn.Conv2d(32, 64, 3, padding=1, stride=2)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        x = torch.relu(self.c4(self.c3(x)))
        return self.fc(x.mean((2, 3)))


X = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(7))


def targeted_params(report, key: str) -> int:
    return sum(getattr(r, key) for r in report.rows)


def test_params_budget_is_met_and_spent_on_the_cheap_layer(gen: torch.Generator) -> None:
    torch.manual_seed(0)
    net = Small().eval()
    with torch.no_grad():
        net.c2.weight.copy_(low_rank_kernel(32, 32, 4, gen))  # exactly rank (4, 4)
    before = targeted_params_of(net)
    report = decompose_(net, TuckerConfig(rank="budget:params=0.33"), include=["c*"])
    rows = {r.name: r for r in report.rows}
    assert targeted_params(report, "params_before") == before
    after = targeted_params(report, "params_after")
    assert after <= 0.33 * before
    assert after == targeted_params_of(net)  # the built layers match the plan's counts
    assert rows["c3"].action == "skipped" and "groups=4" in (rows["c3"].reason or "")
    assert rows["c2"].action == "decomposed" and rows["c2"].ranks is not None
    assert max(rows["c2"].ranks) <= 4 and (rows["c2"].rel_error or 0) < 1e-5
    assert isinstance(net.c2, TuckerConv2d) and net(X).shape == (2, 10)


def targeted_params_of(net: Small) -> int:
    return sum(p.numel() for n in ("c1", "c2", "c3", "c4") for p in getattr(net, n).parameters())


def test_flops_budget_needs_example_input_and_is_met() -> None:
    torch.manual_seed(1)
    net = Small().eval()
    cfg = TuckerConfig(rank="budget:flops=0.5")
    with pytest.raises(ValueError, match="FLOPs budget needs per-sample FLOPs"):
        decompose_(net, cfg, include=["c1", "c2", "c4"])
    report = decompose_(net, cfg, include=["c1", "c2", "c4"], example_input=X)
    before = sum(r.flops_before for r in report.rows)
    assert sum(r.flops_after for r in report.rows) <= 0.5 * before
    assert report.decomposed


class _Upsampler(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(16, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1)
        self.up, self.head = nn.ConvTranspose2d(64, 16, 2, stride=2), nn.Conv1d(16, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(torch.relu(self.c2(torch.relu(self.c1(x)))))
        return self.head(h.flatten(2))


def test_flops_budget_counts_layers_it_cannot_factorise() -> None:
    # a transposed conv or a Conv1d in the model made every FLOPs budget fail with "pass
    # example_input", though it was passed
    torch.manual_seed(0)
    net, x = _Upsampler().eval(), torch.randn(2, 16, 8, 8)
    report = decompose_(net, TuckerConfig(rank="budget:flops=0.5"), example_input=x)
    rows = {r.name: r for r in report.rows}
    assert rows["up"].action == rows["head"].action == "skipped"
    assert rows["up"].flops_before == 2 * 64 * 16 * 4 * 64  # every input position, 2x2 taps
    assert rows["head"].flops_before == 2 * 4 * 16 * 3 * 254
    assert report.budget is not None and report.budget["met"]
    assert net(x).shape == (2, 4, 254)


def test_params_and_flops_budgets_are_met_together() -> None:
    """One plan meets both shares; each single budget alone leaves the other unmet here."""
    torch.manual_seed(1)
    include = ["c1", "c2", "c4"]

    def totals(rank: str) -> tuple[float, float]:
        report = decompose_(
            Small().eval(), TuckerConfig(rank=rank), include=include, example_input=X
        )
        rows = report.rows
        params = sum(r.params_after for r in rows) / sum(r.params_before for r in rows)
        flops = sum(r.flops_after for r in rows) / sum(r.flops_before for r in rows)
        return params, flops

    both = totals("budget:params=0.4,flops=0.6")
    assert both[0] <= 0.4 and both[1] <= 0.6
    p_only, f_only = totals("budget:params=0.4"), totals("budget:flops=0.6")
    assert p_only[0] <= 0.4 and f_only[1] <= 0.6
    with pytest.raises(ValueError, match="names the params budget twice"):
        TuckerConfig(rank="budget:params=0.4,params=0.5")
    with pytest.raises(ValueError, match="budget metric 'bytes'"):
        TuckerConfig(rank="budget:params=0.4,bytes=0.5")


def test_svd_budget_and_sensitivity_weights_shift_the_ranks() -> None:
    def mlp() -> nn.Sequential:
        torch.manual_seed(2)
        return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))

    cfg = SVDConfig(rank="budget:params=0.5")
    plain = {r.name: r for r in decompose_(mlp(), cfg).rows}
    weighted = {r.name: r for r in decompose_(mlp(), cfg, sensitivity={"0": 100.0, "2": 0.01}).rows}
    assert sum(r.params_after for r in weighted.values()) <= 0.5 * 2 * (32 * 32 + 32)
    assert weighted["0"].ranks is not None and weighted["2"].ranks is not None
    assert weighted["0"].ranks[0] > weighted["2"].ranks[0]
    assert plain["0"].action == plain["2"].action == "decomposed"
    with pytest.raises(ValueError, match="sensitivity lacks layer"):
        decompose_(mlp(), cfg, sensitivity={"0": 1.0})
    with pytest.raises(ValueError, match="sensitivity weights only a budget rank spec"):
        decompose_(mlp(), SVDConfig(rank=0.5), sensitivity={"0": 1.0})
    for bad in (float("inf"), float("nan")):  # inf was taken as noise, the least sensitive
        with pytest.raises(ValueError, match="sensitivity must be a finite number for every"):
            decompose_(mlp(), cfg, sensitivity={"0": bad, "2": 1.0})


def test_budget_that_cannot_be_met_is_an_error() -> None:
    net = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4))  # no ladder: only the dense option
    with pytest.raises(ValueError, match=r"params budget 4 of 40 cannot be met"):
        decompose_(net, TuckerConfig(rank="budget:params=0.1"))


def test_a_budget_the_dense_model_meets_keeps_every_layer_and_says_why() -> None:
    net = nn.Sequential(nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3))
    report = decompose_(net, TuckerConfig(rank="budget:params=1.0"))
    assert [r.action for r in report.rows] == ["skipped", "skipped"]
    assert all("plan meets the budget by factorising other" in str(r.reason) for r in report.rows)


def test_ladder_errors_match_the_built_truncations() -> None:
    torch.manual_seed(3)
    conv = nn.Conv2d(16, 24, 3)
    opts = {o.ranks: o for o in tucker_options(conv, TuckerConfig(round_to=4), None, 1)}
    assert opts[()].error == 0.0 and opts[()].params == 16 * 24 * 9 + 24
    assert all(r % 4 == 0 for ranks in opts for r in ranks)
    from slimtorch.decompose import relative_error, tucker2, tucker2_to_full

    w = conv.weight.detach().double()
    hosvd = tucker2_to_full(*tucker2(w, (8, 4), n_iter=0))
    assert opts[(8, 4)].error == pytest.approx(float(relative_error(hosvd, w)), rel=1e-6)
    assert opts[(8, 4)].params == 16 * 4 + 4 * 8 * 9 + 8 * 24 + 24
    wide = tucker_options(nn.Conv2d(3, 64, 3), TuckerConfig(), None, 1)  # unfolding rank 27
    assert max(o.ranks[0] for o in wide[1:]) <= 27
    decompose_(nn.Sequential(nn.Conv2d(3, 64, 3)), TuckerConfig(rank="budget:params=0.5"))
    lin = nn.Linear(20, 12)
    s = torch.linalg.svdvals(lin.weight.detach().double())
    svd = {o.ranks: o for o in svd_options(lin, SVDConfig(), None, 1)}
    assert svd[(3,)].error == pytest.approx(float((s[3:] ** 2).sum().sqrt() / s.norm()), rel=1e-6)
    plan = plan_budget([("fc", lin)], SVDConfig(rank="budget:params=0.6"), {}, 1)
    assert plan.choices["fc"].params <= plan.target == pytest.approx(0.6 * (20 * 12 + 12))


def test_measure_sensitivity_ranks_layers_and_restores_weights(gen: torch.Generator) -> None:
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    with torch.no_grad():  # layer "2" has rank 4: its 25% (rank 8) approximation is exact
        net[2].weight.copy_(torch.randn(32, 4, generator=gen) @ torch.randn(4, 32, generator=gen))
    x = torch.randn(64, 32, generator=gen)
    with torch.no_grad():
        y = net(x)
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    sens = measure_sensitivity(net, ["0", "2"], [(x[:32], y[:32]), (x[32:], y[32:])], nn.MSELoss())
    assert sens["0"] > 1e-3
    assert abs(sens["2"]) < 1e-6
    assert net.training  # mode restored
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, weights[k], rtol=0, atol=0)
    conv_net = Small().eval()
    with torch.no_grad():
        conv_net.c2.weight.copy_(low_rank_kernel(32, 32, 4, gen))  # rank (4, 4) < 25% of 32
        target = conv_net(X)
    s = measure_sensitivity(conv_net, ["c1", "c2", "c3"], (X, target), nn.functional.mse_loss)
    assert s["c1"] > 100 * abs(s["c2"]) and abs(s["c2"]) < 1e-8 and s["c3"] > 0
    with pytest.raises(ValueError, match="layer_names holds 'nope'"):
        measure_sensitivity(net, ["nope"], (x, y), nn.MSELoss())
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\], got 0"):
        measure_sensitivity(net, ["0"], (x, y), nn.MSELoss(), fraction=0)
    with pytest.raises(TypeError, match=r"handles nn\.Linear and nn\.Conv2d"):
        measure_sensitivity(net, ["1"], (x, y), nn.MSELoss())


def test_unmet_budget_names_the_layers_kept_dense() -> None:
    torch.manual_seed(0)
    net = Small()
    with torch.no_grad():
        net.c2.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(
        ValueError,
        match=r"cannot be met .*; c2 stays dense: weights hold NaN/Inf.*; c3 stays dense",
    ):
        decompose_(net, TuckerConfig(rank="budget:params=0.3"), include=["c*"])
    assert type(net.c1) is nn.Conv2d
