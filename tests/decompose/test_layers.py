from __future__ import annotations

import pytest
import torch
from torch import nn

from slimtorch.decompose import (
    CPConv2d,
    LowRankConv2d,
    LowRankLinear,
    TTLinear,
    TuckerConv2d,
    relative_error,
)

CONV_CASES = [
    {"stride": 1, "padding": 1, "dilation": 1, "bias": True},
    {"stride": 2, "padding": 0, "dilation": 1, "bias": False},
    {"stride": (2, 1), "padding": (0, 2), "dilation": (1, 2), "bias": True},
    {"stride": 1, "padding": "same", "dilation": 2, "bias": True},
    {"stride": 1, "padding": "valid", "dilation": 1, "bias": True},
]


def conv(case: dict, c_in: int = 6, c_out: int = 10, k: int | tuple[int, int] = 3) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, k, **case).double()


@pytest.mark.parametrize("case", CONV_CASES)
def test_tucker_conv_full_rank_equals_original(case: dict) -> None:
    ref = conv(case)
    x = torch.randn(2, 6, 11, 9, dtype=torch.float64)
    layer = TuckerConv2d.from_layer(ref, ranks=(10, 6))
    torch.testing.assert_close(layer(x), ref(x))
    assert layer.spec()["bias"] == case["bias"]


@pytest.mark.parametrize("case", CONV_CASES)
def test_cp_conv_exact_factors_equal_original(case: dict) -> None:
    ref = conv(case, k=(3, 2))
    x = torch.randn(2, 6, 11, 9, dtype=torch.float64)
    # A full-rank CP of a (10, 6, 3, 2) kernel: one rank-1 term per (c_in, kh, kw) entry.
    w = ref.weight.detach()
    eye = torch.eye(6 * 3 * 2, dtype=torch.float64)
    factors = [
        w.reshape(10, -1),  # (C_out, R)
        eye.reshape(6, 3, 2, -1).sum((1, 2)),  # (C_in, R)
        eye.reshape(6, 3, 2, -1).sum((0, 2)),  # (kh, R)
        eye.reshape(6, 3, 2, -1).sum((0, 1)),  # (kw, R)
    ]
    bias = None if ref.bias is None else ref.bias.detach()
    layer = CPConv2d.from_factors(
        torch.ones(36, dtype=torch.float64),
        factors,
        bias,
        stride=ref.stride,
        padding=ref.padding,
        dilation=ref.dilation,
    )
    torch.testing.assert_close(layer(x), ref(x))


@torch.no_grad()
def test_lower_rank_approximates_and_improves_with_rank() -> None:
    ref = conv(CONV_CASES[0], c_in=16, c_out=16)
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    errs = [
        float(relative_error(TuckerConv2d.from_layer(ref, ranks=(r, r))(x), ref(x)))
        for r in (4, 8, 12)
    ]
    assert errs[0] > errs[1] > errs[2] > 0
    assert errs[0] < 1.0
    cp = CPConv2d.from_layer(ref, 48, n_iter=100, require_convergence=False)
    assert float(relative_error(cp(x), ref(x))) < 1.0


@pytest.mark.parametrize("bias", [True, False])
@torch.no_grad()
def test_low_rank_linear_and_conv1x1(bias: bool) -> None:
    lin = nn.Linear(12, 8, bias=bias).double()
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    torch.testing.assert_close(LowRankLinear.from_layer(lin, 8)(x), lin(x))
    low = LowRankLinear.from_layer(lin, 3)
    assert 0 < float(relative_error(low(x), lin(x))) < 1
    c = nn.Conv2d(12, 8, 1, stride=2, padding=1, bias=bias).double()
    xc = torch.randn(2, 12, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(LowRankConv2d.from_layer(c, 8)(xc), c(xc))


def test_tt_linear_matches_its_full_weight_and_the_original() -> None:
    lin = nn.Linear(24, 30).double()
    x = torch.randn(4, 2, 24, dtype=torch.float64)
    exact = TTLinear.from_layer(lin, in_modes=(2, 3, 4), out_modes=(3, 2, 5))
    torch.testing.assert_close(exact(x), lin(x))
    low = TTLinear.from_layer(lin, (2, 3, 4), (3, 2, 5), max_rank=2)
    torch.testing.assert_close(low(x), x @ low.full_weight().mT + low.bias)
    assert sum(c.numel() for c in low.cores) < 24 * 30


@pytest.mark.parametrize(
    "make",
    [
        lambda: TuckerConv2d(6, 10, 3, (4, 3), stride=2, padding=1),
        lambda: CPConv2d(6, 10, 3, 5, padding=(1, 0), dilation=(2, 1)),
        lambda: LowRankConv2d(6, 10, 3, stride=2),
    ],
)
def test_conv_layers_export_and_rebuild_from_spec(make) -> None:
    layer = make().eval()
    x = torch.randn(1, 6, 9, 9)
    program = torch.export.export(layer, (x,))
    torch.testing.assert_close(program.module()(x), layer(x))
    twin = type(layer).from_spec(layer.spec())
    twin.load_state_dict(layer.state_dict())
    torch.testing.assert_close(twin(x), layer(x))


@pytest.mark.parametrize(
    "make", [lambda: LowRankLinear(12, 8, 3), lambda: TTLinear((3, 4), (2, 4), (3,))]
)
def test_linear_layers_export_and_rebuild_from_spec(make) -> None:
    layer = make().eval()
    x = torch.randn(5, 12)
    program = torch.export.export(layer, (x,))
    torch.testing.assert_close(program.module()(x), layer(x))
    twin = type(layer).from_spec(layer.spec())
    twin.load_state_dict(layer.state_dict())
    torch.testing.assert_close(twin(x), layer(x))


def test_flops_count_the_sub_layers() -> None:
    tucker = TuckerConv2d(8, 16, 3, (4, 2), stride=2, padding=1)
    # 1x1 at 10x10: 2*2*8*100; core at 5x5: 2*4*2*9*25; 1x1 at 5x5: 2*16*4*25
    assert tucker.flops((10, 10)) == 3200 + 3600 + 3200
    cp = CPConv2d(8, 16, 3, 4, stride=2, padding=1)
    # first 10x10, vertical -> 5x10, horizontal -> 5x5, last 5x5
    assert cp.flops((10, 10)) == 2 * 4 * 8 * 100 + 2 * 4 * 3 * 50 + 2 * 4 * 3 * 25 + 2 * 16 * 4 * 25
    assert LowRankLinear(10, 6, 2).flops(3) == 2 * 3 * 2 * 16
    # TT: step 1 contracts n1 with core1 for each of 4 remaining inputs
    tt = TTLinear((3, 4), (2, 4), (3,))
    assert tt.flops() == 2 * (1 * 4 * 1 * 3 * 2 * 3) + 2 * (2 * 1 * 3 * 4 * 4 * 1)


def test_refusals_say_why() -> None:
    with pytest.raises(ValueError, match="groups=2"):
        TuckerConv2d.from_layer(nn.Conv2d(4, 4, 3, groups=2), (2, 2))
    with pytest.raises(ValueError, match="padding_mode='zeros' only"):
        CPConv2d.from_layer(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), 4)
    with pytest.raises(ValueError, match="no spatial factors"):
        CPConv2d.from_layer(nn.Conv2d(4, 4, 1), 2)
    with pytest.raises(ValueError, match="needs a 1x1 conv"):
        LowRankConv2d.from_layer(nn.Conv2d(4, 4, 3), 2)
    with pytest.raises(ValueError, match=r"prod\(in_modes\)=12"):
        TTLinear.from_layer(nn.Linear(10, 8), in_modes=(3, 4), out_modes=(2, 4))
    with pytest.raises(TypeError, match=r"needs an nn\.Linear"):
        LowRankLinear.from_layer(nn.Conv2d(2, 2, 1), 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="factor shapes do not fit"):
        TuckerConv2d.from_factors(torch.zeros(2, 2, 3, 3), torch.zeros(4, 3), torch.zeros(4, 2))


BAD_RANKS = {
    "lowrank-linear-0": (
        lambda: LowRankLinear(16, 8, 0),
        ValueError,
        r"LowRankLinear rank .* got 0",
    ),
    "lowrank-linear-float": (lambda: LowRankLinear(16, 8, 2.5), TypeError, r"must be an int"),
    "lowrank-conv-neg": (lambda: LowRankConv2d(16, 8, -1), ValueError, r"LowRankConv2d .* got -1"),
    "tucker-r_out-0": (lambda: TuckerConv2d(16, 8, 3, ranks=(0, 4)), ValueError, r"\(r_out\) must"),
    "tucker-r_in-neg": (
        lambda: TuckerConv2d(16, 8, 3, ranks=(4, -2)),
        ValueError,
        r"\(r_in\) must",
    ),
    "cp-0": (lambda: CPConv2d(16, 8, 3, rank=0), ValueError, r"CPConv2d rank must be .* got 0"),
}


@pytest.mark.parametrize("case", BAD_RANKS)
def test_constructors_refuse_ranks_below_one(case: str) -> None:
    """Built directly (or from a saved spec), a layer of rank < 1 is refused, not built empty."""
    build, error, message = BAD_RANKS[case]
    with pytest.raises(error, match=message):
        build()
