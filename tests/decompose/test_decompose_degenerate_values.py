"""Degenerate weights: extreme scales, non-finite factors, flat spectra under rank='vbmf'.

A factorisation must not depend on the weights' scale (the Gram matrices square them in
float32), a non-finite result must never be written into the model, and EVBMF finding no
component must skip the layer rather than keep one rank-1 term of it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimtorch.core.errors import TransformSkipError
from slimtorch.decompose import (
    CPConfig,
    Factorised,
    SVDConfig,
    TuckerConfig,
    cp_als,
    cp_als_many,
    decompose_,
    parse_rank_spec,
    select_mode_rank,
    tucker2,
)
from slimtorch.decompose import transform as transform_module
from slimtorch.decompose.linalg import leading_left_singular_vectors, leading_singular_subspaces

# Powers of two: the weights scaled by them give bit-identical factors, scaled back exactly.
# 2**66 (7e19) overflows the float32 Gram matrices of unit-scale weights, 2**-80 (8e-25)
# underflows them.
EXACT_SCALES = [2.0**66, 2.0**-80]
SCALES = [1e20, 1e-23]  # max |w| about 6e18 and 6e-25 for a default-initialised conv


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def kernel(seed: int = 0, shape: tuple[int, ...] = (16, 16, 3, 3)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen) * 0.05  # float32, like a trained layer's


def conv_net(scale: float, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False))
    with torch.no_grad():
        net[0].weight.mul_(scale)
    return net.eval()


def all_finite(module: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


@pytest.mark.parametrize("scale", EXACT_SCALES)
def test_leading_vectors_do_not_depend_on_scale(scale: float) -> None:
    m = kernel(1, (8, 64))  # wide: the Gram path
    ref = leading_left_singular_vectors(m, 3)
    assert torch.equal(leading_left_singular_vectors(m * scale, 3), ref)
    tall = kernel(2, (40, 10))
    for got, want in zip(
        leading_singular_subspaces(tall * scale, 4, 3),
        leading_singular_subspaces(tall, 4, 3),
        strict=True,
    ):
        assert torch.equal(got, want)


@pytest.mark.parametrize("scale", EXACT_SCALES)
@pytest.mark.parametrize("shape", [(16, 16, 3, 3), (16, 12, 1, 1)])
def test_tucker2_does_not_depend_on_scale(scale: float, shape: tuple[int, ...]) -> None:
    w = kernel(0, shape)
    core, u_out, u_in = tucker2(w, (4, 4), n_iter=10)
    s_core, s_out, s_in = tucker2(w * scale, (4, 4), n_iter=10)
    assert torch.equal(s_out, u_out) and torch.equal(s_in, u_in)
    assert torch.equal(s_core, core * scale)  # the scale goes back into the core, exactly


@pytest.mark.parametrize("scale", EXACT_SCALES)
def test_cp_als_does_not_depend_on_scale(scale: float) -> None:
    w = kernel(0, (8, 8, 3, 3))
    opts = {"n_iter": 30, "require_convergence": False}
    ref = cp_als(w, 6, **opts)
    got = cp_als(w * scale, 6, **opts)
    assert got.rel_error == ref.rel_error and got.iterations == ref.iterations
    assert torch.equal(got.weights, ref.weights * scale)
    for a, b in zip(got.factors, ref.factors, strict=True):
        assert torch.equal(a, b)


def test_cp_als_many_does_not_depend_on_scale_and_tiny_is_not_zero() -> None:
    w = kernel(0, (8, 8, 3, 3))
    opts = {"n_iter": 30, "require_convergence": False}
    ref = cp_als(w, 6, **opts)
    scales = [2.0**-80, 1.0, 2.0**66]
    out = cp_als_many([w * s for s in scales], [6, 6, 6], **opts)
    for s, got in zip(scales, out, strict=True):
        assert bool((got.weights != 0).all())  # 2**-80 is not the zero tensor
        assert got.rel_error == pytest.approx(ref.rel_error, rel=1e-5)
        torch.testing.assert_close(got.weights / s, ref.weights, rtol=1e-4, atol=0)
        for a, b in zip(got.factors, ref.factors, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    zero = cp_als_many([torch.zeros(8, 8, 3, 3)], [6], **opts)[0]
    assert zero.rel_error == 0.0 and bool((zero.weights == 0).all())


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize(
    "config",
    [
        TuckerConfig(rank=0.25),
        TuckerConfig(rank=0.25, batch_kernels=True),
        CPConfig(rank=0.25, n_iter=60, require_convergence=False),
        CPConfig(rank=0.25, n_iter=60, require_convergence=False, batch_kernels=True),
    ],
    ids=["tucker", "tucker-batched", "cp", "cp-batched"],
)
def test_decompose_at_extreme_scales_matches_unit_scale(
    config: TuckerConfig | CPConfig, scale: float
) -> None:
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    unit, big = conv_net(1.0), conv_net(scale)
    with torch.no_grad():
        ref_unit, ref_big = unit(x).double(), big(x).double()
    row_unit = decompose_(unit, config).rows[0]
    row = decompose_(big, config).rows[0]
    assert row.action == "decomposed", row.reason
    assert all_finite(big)
    assert row.rel_error == pytest.approx(row_unit.rel_error, rel=1e-4)
    with torch.no_grad():
        err_unit = float((unit(x).double() - ref_unit).norm() / ref_unit.norm())
        err = float((big(x).double() - ref_big).norm() / ref_big.norm())
    assert err == pytest.approx(err_unit, rel=1e-3)  # the true output error, not 1.0


@pytest.mark.parametrize(
    "config",
    [
        TuckerConfig(rank=0.25),
        TuckerConfig(rank=0.25, batch_kernels=True),
        CPConfig(rank=0.25, n_iter=20, require_convergence=False),
    ],
    ids=["tucker", "tucker-batched", "cp"],
)
def test_overflowing_factors_skip_the_layer(config: TuckerConfig | CPConfig) -> None:
    # Finite weights near float32's limit (3.4e38): the rank-1 kernel's core value (or CP
    # weight) is 3e38 * sqrt(16 * 16 * 9), which float32 cannot hold.
    net = conv_net(1.0)
    with torch.no_grad():
        net[0].weight.fill_(3e38)
    conv, before = net[0], net[0].weight.detach().clone()
    row = decompose_(net, config).rows[0]
    assert row.action == "skipped" and row.reason.startswith("decomposition gave non-finite")
    assert "max |w|" in row.reason and row.rel_error is None
    assert net[0] is conv and torch.equal(conv.weight, before)  # the original layer is kept
    with pytest.raises(TransformSkipError, match="0: decomposition gave non-finite factors"):
        decompose_(net, config, strict=True)
    assert net[0] is conv


def nan_weight_handler(module: nn.Module, config: SVDConfig, name: str) -> Factorised:
    bad = nn.Linear(8, 2)
    with torch.no_grad():
        bad.weight[0, 0] = float("nan")
    return Factorised(bad, [2], 0.5)


def nan_error_handler(module: nn.Module, config: SVDConfig, name: str) -> Factorised:
    return Factorised(nn.Linear(8, 2), [2], float("nan"))


@pytest.mark.parametrize(
    ("handler", "listed"),
    [(nan_weight_handler, "parameters: weight"), (nan_error_handler, "rel_error nan")],
)
def test_non_finite_result_of_any_handler_is_refused(
    monkeypatch: pytest.MonkeyPatch, handler, listed: str
) -> None:
    monkeypatch.setattr(transform_module, "find_handler", lambda config, module: handler)
    net = nn.Sequential(nn.Linear(8, 8))
    layer = net[0]
    row = decompose_(net, SVDConfig(rank=2)).rows[0]
    assert row.action == "skipped" and "non-finite" in row.reason and listed in row.reason
    assert net[0] is layer


def dirac_conv() -> nn.Conv2d:
    conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    nn.init.dirac_(conv.weight)  # the identity: a flat spectrum
    return conv


def orthogonal_linear() -> nn.Linear:
    torch.manual_seed(0)
    linear = nn.Linear(64, 64, bias=False)
    nn.init.orthogonal_(linear.weight)
    return linear


@pytest.mark.parametrize(
    ("make", "config"),
    [(dirac_conv, TuckerConfig(rank="vbmf")), (orthogonal_linear, SVDConfig(rank="vbmf"))],
    ids=["dirac-tucker", "orthogonal-svd"],
)
def test_vbmf_skips_a_flat_spectrum(make, config: TuckerConfig | SVDConfig) -> None:
    net = nn.Sequential(make())
    layer, before = net[0], net[0].weight.detach().clone()
    row = decompose_(net, config).rows[0]
    assert row.action == "skipped" and row.ranks is None
    assert row.reason.startswith("EVBMF found no component above its noise threshold")
    assert "give an int, a fraction or 'energy:<x>' rank instead" in row.reason
    assert net[0] is layer and torch.equal(layer.weight, before)
    with pytest.raises(TransformSkipError, match="EVBMF found no component"):
        decompose_(net, config, strict=True)


def test_vbmf_rank_of_a_flat_zero_and_low_rank_matrix() -> None:
    from slimtorch.decompose.ranks import NoRankError

    spec = parse_rank_spec("vbmf")
    with pytest.raises(NoRankError, match=r"in the 16 x 16 unfolding"):
        select_mode_rank(spec, torch.eye(16))
    assert select_mode_rank(spec, torch.zeros(16, 40)) == 1  # the zero matrix: exact at rank 1
    gen = torch.Generator().manual_seed(0)
    low = torch.randn(30, 3, generator=gen) @ torch.randn(3, 50, generator=gen)
    assert select_mode_rank(spec, low + 0.05 * torch.randn(30, 50, generator=gen)) == 3


def test_vbmf_still_decomposes_a_low_rank_layer() -> None:
    gen = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 48))
    with torch.no_grad():
        low = torch.randn(48, 4, generator=gen) @ torch.randn(4, 64, generator=gen)
        net[0].weight.copy_(low + 0.01 * torch.randn(48, 64, generator=gen))
    row = decompose_(net, SVDConfig(rank="vbmf")).rows[0]
    assert row.action == "decomposed" and row.ranks == [4] and row.rel_error < 0.05
