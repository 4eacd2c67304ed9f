"""Fused Tucker-2 convolution: the C kernel, its build/load, the layer, and ``fuse_tucker_``."""

from __future__ import annotations

import copy
import itertools
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fused_helpers import reference_of
from slimtorch.core.errors import TransformSkipError
from slimtorch.decompose import (
    FusedTuckerConv2d,
    FuseReport,
    TuckerConfig,
    TuckerConv2d,
    decompose_,
    fuse_tucker_,
    fused,
    fused_op,
    native,
)
from slimtorch.decompose.fused import TRANSFORM_NAME
from slimtorch.decompose.fused_op import _tucker_block, tucker_block
from slimtorch.decompose.fused_op import reference as _reference
from slimtorch.models import create_model, load_model, save_model

ATOL = RTOL = 1e-4


# --------------------------------------------------------------------------- helpers, fixtures


def kernel_available() -> bool:
    return native.kernel_status().available


@pytest.fixture
def fresh_native(monkeypatch: pytest.MonkeyPatch):
    """Forget the loaded kernel before and after, so env changes (via monkeypatch) take effect
    and later tests see the normal state again (monkeypatch restores the env after this)."""
    monkeypatch.delenv("SLIMTORCH_NO_NATIVE", raising=False)
    native._load_once.cache_clear()
    yield monkeypatch
    native._load_once.cache_clear()


@pytest.fixture
def kernel_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the fused layer falls back to library convolutions."""

    def no_fallback(*args, **kwargs):
        raise AssertionError("the fused layer used the library-convolution fallback")

    monkeypatch.setattr(fused_op, "reference", no_fallback)
    monkeypatch.setattr(fused, "reference", no_fallback)


def make_tucker(
    c_in: int,
    c_out: int,
    kernel_size,
    ranks: tuple[int, int],
    *,
    stride=1,
    padding=0,
    dilation=1,
    bias: bool = True,
    seed: int = 0,
) -> TuckerConv2d:
    torch.manual_seed(seed)
    layer = TuckerConv2d(
        c_in,
        c_out,
        kernel_size,
        ranks,
        stride=stride,
        padding=padding,
        dilation=dilation,
        bias=bias,
    ).eval()
    if bias:
        with torch.no_grad():
            layer.last.bias.uniform_(-0.5, 0.5)
    return layer


def plain_forward(layer: TuckerConv2d, x, residual, relu: bool) -> torch.Tensor:
    y = layer(x)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def check_against_plain(
    plain: TuckerConv2d, n: int, h: int, w: int, relu: bool, use_residual: bool, seed: int = 1
) -> None:
    layer = FusedTuckerConv2d.from_tucker(plain, relu=relu, residual=use_residual).eval()
    torch.manual_seed(seed)
    x = torch.randn(n, plain.first.in_channels, h, w)
    with torch.no_grad():
        expect_shape = plain(x).shape
        res = torch.randn(expect_shape) if use_residual else None
        expected = plain_forward(plain, x, res, relu)
        ref = reference_of(layer, x, res)
        got = layer(x, res) if use_residual else layer(x)
    assert got.shape == expect_shape and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)
    if relu:
        assert bool((got >= 0).all())


@pytest.fixture
def use_kernel_if_available(request: pytest.FixtureRequest) -> bool:
    """Where the kernel is available, forbid the fallback (so the kernel itself is checked);
    otherwise the same checks run on the fallback."""
    if kernel_available():
        request.getfixturevalue("kernel_only")
        return True
    return False


# --------------------------------------------------------------------------- 1. numerics

KERNELS = [1, 3, (3, 5)]
STRIDES = [1, 2, (2, 1)]
PADDINGS = [0, 1, (1, 2)]
DILATIONS = [1, 2]
GEOMETRIES = list(itertools.product(KERNELS, STRIDES, PADDINGS, DILATIONS))


def _id(v) -> str:
    return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)


GEOMETRY_IDS = [f"k{_id(k)}-s{_id(s)}-p{_id(p)}-d{d}" for k, s, p, d in GEOMETRIES]


@pytest.mark.parametrize(
    ("kernel_size", "stride", "padding", "dilation"), GEOMETRIES, ids=GEOMETRY_IDS
)
def test_geometry_matches_plain_tucker_and_reference(
    use_kernel_if_available: bool, kernel_size, stride, padding, dilation
) -> None:
    i = GEOMETRIES.index((kernel_size, stride, padding, dilation))
    ranks = [(1, 1), (4, 4), (5, 3), (16, 9)][i % 4]
    n, h, w = [(1, 7, 9), (3, 8, 10), (2, 11, 9)][i % 3]  # >= the 5x9 dilated (3, 5)
    plain = make_tucker(
        6, 10, kernel_size, ranks, stride=stride, padding=padding, dilation=dilation,
        bias=i % 2 == 0, seed=i,
    )  # fmt: skip
    for relu, use_residual in itertools.product((False, True), repeat=2):
        check_against_plain(plain, n, h, w, relu, use_residual, seed=100 + i)


@pytest.mark.parametrize("ranks", [(1, 1), (4, 4), (5, 3), (16, 9)])
@pytest.mark.parametrize(("n", "h", "w"), [(1, 7, 9), (3, 7, 9), (1, 1, 1), (2, 16, 16)])
@pytest.mark.parametrize(("relu", "use_residual"), [(False, False), (True, False), (True, True)])
def test_ranks_and_sizes_match_plain_tucker(
    use_kernel_if_available: bool, ranks, n, h, w, relu, use_residual
) -> None:
    # 17 input and 9 output channels: not multiples of the kernel's 4/8-channel blocks
    plain = make_tucker(17, 9, 3, ranks, padding=1, seed=sum(ranks) + h)
    check_against_plain(plain, n, h, w, relu, use_residual)


@pytest.mark.parametrize("channels", [(1, 1), (3, 16), (32, 64)])
def test_channel_counts(use_kernel_if_available: bool, channels) -> None:
    c_in, c_out = channels
    plain = make_tucker(c_in, c_out, 3, (min(8, c_out), min(4, c_in)), padding=1, stride=2)
    check_against_plain(plain, 2, 9, 9, relu=True, use_residual=True)


def test_kernel_path_runs_without_fallback(kernel_only: None) -> None:
    if not kernel_available():
        pytest.skip(f"fused kernel unavailable: {native.kernel_status().detail}")
    assert isinstance(native.kernel_status().detail, str)
    assert Path(native.kernel_status().detail).is_file()
    layer = FusedTuckerConv2d(4, 8, 3, ranks=(4, 2), padding=1, relu=True).eval()
    with torch.no_grad():
        y = layer(torch.randn(2, 4, 5, 5))
    assert y.shape == (2, 8, 5, 5) and bool((y >= 0).all())


def test_kernel_restores_the_callers_denormal_mode(kernel_only: None) -> None:
    if not kernel_available():
        pytest.skip(f"fused kernel unavailable: {native.kernel_status().detail}")
    tiny = torch.tensor([1e-40])  # a float32 denormal
    assert tiny.item() != 0 and (tiny * 1.0).item() != 0
    layer = FusedTuckerConv2d(4, 8, 3, ranks=(4, 2), padding=1).eval()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        layer(x)
    assert (tiny * 1.0).item() != 0, "flush-to-zero leaked out of the kernel"
    torch.set_flush_denormal(True)  # the probe does see the mode
    try:
        flushed = (tiny * 1.0).item()
    finally:
        torch.set_flush_denormal(False)
    assert flushed == 0
    # denormal-sized values flushed inside the kernel stay within the tolerance
    with torch.no_grad():
        small = layer(x * 1e-36)
        torch.testing.assert_close(small, reference_of(layer, x * 1e-36), atol=1e-30, rtol=1e-3)


def test_non_contiguous_inputs(use_kernel_if_available: bool) -> None:
    plain = make_tucker(8, 8, 3, (4, 4), padding=1)
    layer = FusedTuckerConv2d.from_tucker(plain, residual=True).eval()
    x = torch.randn(2, 8, 6, 7).to(memory_format=torch.channels_last)
    res = torch.randn(2, 7, 6, 8).permute(0, 3, 2, 1)  # (2, 8, 6, 7), not contiguous
    assert not res.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(layer(x, res), plain(x) + res, atol=ATOL, rtol=RTOL)


def test_empty_batch(use_kernel_if_available: bool) -> None:
    layer = FusedTuckerConv2d(4, 6, 3, ranks=(3, 2), padding=1).eval()
    with torch.no_grad():
        assert layer(torch.randn(0, 4, 5, 5)).shape == (0, 6, 5, 5)


def test_from_tucker_copies_weights_and_adds_zero_bias() -> None:
    plain = make_tucker(
        6, 10, (3, 5), (5, 3), stride=(2, 1), padding=(1, 2), dilation=2, bias=False
    )
    layer = FusedTuckerConv2d.from_tucker(plain, relu=True, residual=True)
    assert isinstance(layer, TuckerConv2d)
    assert layer.ranks == plain.ranks == (5, 3)
    assert layer.core.stride == (2, 1) and layer.core.padding == (1, 2)
    assert layer.core.dilation == (2, 2) and layer.core.kernel_size == (3, 5)
    assert layer.relu is True and layer.adds_residual is True
    for name in ("first", "core", "last"):
        assert torch.equal(getattr(layer, name).weight, getattr(plain, name).weight)
    assert layer.last.bias is not None and torch.equal(layer.last.bias, torch.zeros(10))
    assert "relu=True" in repr(layer) and "residual=True" in repr(layer)
    # the fused layer owns its weights: changing it leaves the source alone
    with torch.no_grad():
        layer.first.weight.zero_()
    assert plain.first.weight.abs().sum() > 0


# --------------------------------------------------------------------------- 2. threads


def test_thread_count_does_not_change_the_output() -> None:
    plain = make_tucker(8, 16, 3, (8, 4), padding=1, stride=(2, 1))
    layer = FusedTuckerConv2d.from_tucker(plain, relu=True, residual=True).eval()
    x = torch.randn(5, 8, 9, 7)
    with torch.no_grad():
        res = torch.randn(plain(x).shape)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            with torch.no_grad():
                outs.append(layer(x, res))
    finally:
        torch.set_num_threads(before)
    assert torch.get_num_threads() == before
    if kernel_available():  # one image per thread, same code: bit for bit
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    else:  # library convolutions may reduce in another order
        torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(outs[0], outs[2], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(outs[0], torch.relu(plain(x) + res), atol=ATOL, rtol=RTOL)


# --------------------------------------------------------------------------- 3. fallbacks


def _sample_layer() -> tuple[FusedTuckerConv2d, torch.Tensor, torch.Tensor, torch.Tensor]:
    plain = make_tucker(6, 8, 3, (4, 3), padding=1, stride=2)
    layer = FusedTuckerConv2d.from_tucker(plain, relu=True, residual=True).eval()
    x = torch.randn(3, 6, 7, 9)
    res = torch.randn(3, 8, 4, 5)
    with torch.no_grad():
        expected = torch.relu(plain(x) + res)
    return layer, x, res, expected


def test_float64_runs_reference_without_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    layer, x, res, expected = _sample_layer()
    with torch.no_grad():
        y32 = layer(x, res)

    def no_kernel():
        raise AssertionError("float64 input must not reach the C kernel")

    monkeypatch.setattr(native, "kernel", no_kernel)
    layer64 = copy.deepcopy(layer).double()
    with torch.no_grad():
        y64 = layer64(x.double(), res.double())
        ref64 = reference_of(layer64, x.double(), res.double())
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64, ref64, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(y64.float(), y32, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(y64.float(), expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("half", ["x", "residual", "both"])
def test_autocast_runs_the_float32_kernel(kernel_only: None, half: str) -> None:
    # under autocast a bf16 map (or residual) is cast up and the float32 kernel runs, as for
    # autocast's float32 ops; the kernel_only fixture fails the test on a library fallback
    if not kernel_available():
        pytest.skip(f"fused kernel unavailable: {native.kernel_status().detail}")
    layer, x, res, _ = _sample_layer()
    xs = x.bfloat16() if half in ("x", "both") else x
    rs = res.bfloat16() if half in ("residual", "both") else res
    with torch.no_grad():
        want = layer(xs.float(), rs.float())
        with torch.autocast("cpu", torch.bfloat16):
            got = layer(xs, rs)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_half_precision_without_autocast_stays_in_its_dtype() -> None:
    layer, x, res, expected = _sample_layer()
    half = copy.deepcopy(layer).bfloat16()
    with torch.no_grad():
        y = half(x.bfloat16(), res.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, atol=0.1, rtol=0.05)


def test_autocast_operator_and_compiled_model_compute_in_float32() -> None:
    model = TwoFused().eval()
    x = torch.randn(2, 4, 7, 9).bfloat16()
    with torch.no_grad():
        expected = model(x.float())
        a = model.a
        args = (a.first.weight.flatten(1), a.core.weight, a.last.weight.flatten(1), a.last.bias)
        with torch.autocast("cpu", torch.bfloat16):
            op = tucker_block(x, *args, None, [1, 1], [1, 1], [1, 1], True)
        assert op.dtype == torch.float32  # the operator's autocast rule cast its input up
        torch.testing.assert_close(op, a(x.float()), atol=0, rtol=0)
        torch._dynamo.reset()
        try:
            with torch.autocast("cpu", torch.bfloat16):
                got = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
        finally:
            torch._dynamo.reset()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_parametrised_weight_is_read_through_its_parametrisation() -> None:
    # the layer reads its factors from the parameter dictionaries for speed; a parametrised
    # weight lives elsewhere, and must still be the one used
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    layer, x, res, _ = _sample_layer()
    plain = copy.deepcopy(layer)
    with torch.no_grad():
        plain.first.weight.mul_(2)
        parametrize.register_parametrization(layer.first, "weight", Double())
        torch.testing.assert_close(layer(x, res), plain(x, res), atol=ATOL, rtol=RTOL)


def test_no_native_env_disables_the_kernel(fresh_native: pytest.MonkeyPatch) -> None:
    layer, x, res, expected = _sample_layer()
    fresh_native.setenv("SLIMTORCH_NO_NATIVE", "1")
    native._load_once.cache_clear()
    status = native.kernel_status()
    assert status.available is False
    assert "SLIMTORCH_NO_NATIVE" in status.detail
    assert native.kernel() is None
    with torch.no_grad():
        torch.testing.assert_close(layer(x, res), expected, atol=ATOL, rtol=RTOL)


def test_threads_asking_at_once_build_the_kernel_once(fresh_native: pytest.MonkeyPatch) -> None:
    # functools.cache let every thread's first call run the build: 8 threads, 8 compiles
    import threading
    import time

    builds = []
    real = native._build

    def slow_build(*args: object) -> object:
        builds.append(1)
        time.sleep(0.2)
        return real(*args)

    fresh_native.setattr(native, "_build", slow_build)
    threads = [threading.Thread(target=native.kernel_status) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1


def test_no_native_zero_does_not_disable(fresh_native: pytest.MonkeyPatch) -> None:
    fresh_native.delenv("SLIMTORCH_NO_NATIVE", raising=False)
    native._load_once.cache_clear()
    normal = native.kernel_status()
    fresh_native.setenv("SLIMTORCH_NO_NATIVE", "0")
    native._load_once.cache_clear()
    assert native.kernel_status() == normal


def test_missing_compiler_is_reported_and_falls_back(fresh_native: pytest.MonkeyPatch) -> None:
    layer, x, res, expected = _sample_layer()
    fresh_native.setenv("SLIMTORCH_CC", "/nonexistent")
    native._load_once.cache_clear()
    status = native.kernel_status()
    assert status.available is False
    assert "compiler" in status.detail and "/nonexistent" in status.detail
    assert native.kernel() is None
    with torch.no_grad():
        torch.testing.assert_close(layer(x, res), expected, atol=ATOL, rtol=RTOL)


def test_fallback_state_does_not_leak_into_other_tests() -> None:
    # runs after the env tests above: what is cached now is what the real env gives
    cached = native.kernel_status()
    native._load_once.cache_clear()
    assert native.kernel_status() == cached


# --------------------------------------------------------------------------- 4. gradients


@pytest.mark.parametrize(("relu", "use_residual"), [(False, False), (True, True)])
def test_training_is_differentiable_and_matches_plain(relu: bool, use_residual: bool) -> None:
    plain = make_tucker(6, 8, 3, (4, 3), padding=1, stride=(2, 1))
    layer = FusedTuckerConv2d.from_tucker(plain, relu=relu, residual=use_residual).train()
    plain.train()
    x = torch.randn(2, 6, 7, 9)
    res = torch.randn(2, 8, 4, 9) if use_residual else None
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ra = rb = None
    if res is not None:
        ra, rb = res.clone().requires_grad_(), res.clone().requires_grad_()
    ya = layer(xa, ra) if use_residual else layer(xa)
    yb = plain_forward(plain, xb, rb, relu)
    assert ya.requires_grad and ya.grad_fn is not None
    ya.square().sum().backward()
    yb.square().sum().backward()
    for name in ("first", "core", "last"):
        grad = getattr(layer, name).weight.grad
        assert grad is not None and bool(torch.isfinite(grad).all()) and grad.abs().sum() > 0
        torch.testing.assert_close(grad, getattr(plain, name).weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.last.bias.grad, plain.last.bias.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-4, rtol=1e-4)
    if use_residual:
        torch.testing.assert_close(ra.grad, rb.grad, atol=1e-4, rtol=1e-4)


def test_training_step_changes_the_weights() -> None:
    layer = FusedTuckerConv2d(4, 4, 3, ranks=(2, 2), padding=1, relu=True).train()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = [p.detach().clone() for p in layer.parameters()]
    loss = layer(torch.randn(2, 4, 5, 5)).sum()
    loss.backward()
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, layer.parameters(), strict=True))


def test_frozen_layer_still_passes_gradients_to_its_input() -> None:
    if not kernel_available():
        pytest.skip("the fallback is differentiable; the bug is in choosing the kernel path")
    layer = FusedTuckerConv2d(4, 4, 3, ranks=(2, 2), padding=1).eval().requires_grad_(False)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    y = layer(x)
    assert y.requires_grad, "output detached from the input: gradients silently dropped"
    y.sum().backward()
    assert x.grad is not None


# --------------------------------------------------------------------------- 5. bad input


def test_bad_inputs_raise_value_errors(use_kernel_if_available: bool) -> None:
    layer = FusedTuckerConv2d(4, 6, 3, ranks=(3, 2), padding=1).eval()
    res_layer = FusedTuckerConv2d(4, 6, 3, ranks=(3, 2), padding=1, residual=True).eval()
    small = FusedTuckerConv2d(4, 6, 5, ranks=(3, 2), dilation=2).eval()  # needs 9x9 inputs
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"expects input \(N, 4, H, W\), got \(2, 3, 5, 5\)"):
            layer(torch.randn(2, 3, 5, 5))
        with pytest.raises(ValueError, match=r"expects input \(N, 4, H, W\)"):
            layer(torch.randn(2, 4, 5, 5, 1))
        with pytest.raises(
            ValueError, match=r"residual must have the output's shape \(2, 6, 5, 5\)"
        ):
            res_layer(x, torch.randn(2, 6, 5, 4))
        with pytest.raises(ValueError, match=r"residual must have the output's shape"):
            res_layer(x, torch.randn(1, 6, 1, 1))  # no broadcasting
        with pytest.raises(ValueError, match=r"adds a residual: call it as layer\(x, residual\)"):
            res_layer(x)
        with pytest.raises(ValueError, match=r"takes no residual: call it as layer\(x\)"):
            layer(x, torch.randn(2, 6, 5, 5))
        with pytest.raises(ValueError, match=r"input \(1, 4, 8, 9\) is too small"):
            small(torch.randn(1, 4, 8, 9))
        assert small(torch.randn(1, 4, 9, 9)).shape == (1, 6, 1, 1)


def test_bad_factor_shapes_raise() -> None:
    x, u, k = torch.randn(1, 4, 5, 5), torch.randn(3, 4), torch.randn(2, 3, 3, 3)
    v, b = torch.randn(6, 2), torch.randn(6)
    args = ([1, 1], [1, 1], [1, 1], False)
    assert _tucker_block(x, u, k, v, b, None, *args).shape == (1, 6, 5, 5)
    with pytest.raises(ValueError, match="factor shapes do not chain"):
        _tucker_block(x, u, torch.randn(2, 2, 3, 3), v, b, None, *args)
    with pytest.raises(ValueError, match="factor shapes do not chain"):
        _tucker_block(x, u, k, torch.randn(6, 3), b, None, *args)
    with pytest.raises(ValueError, match="factor shapes do not chain"):
        _tucker_block(x, u, k, v, torch.randn(5), None, *args)


def test_string_padding_is_rejected() -> None:
    with pytest.raises(ValueError, match="integer padding"):
        FusedTuckerConv2d(4, 6, 3, ranks=(3, 2), padding="same")


def test_unbatched_input_gets_a_clear_error() -> None:
    layer = FusedTuckerConv2d(4, 6, 3, ranks=(3, 2), padding=1).eval()
    with torch.no_grad(), pytest.raises(ValueError, match="expects input"):
        layer(torch.randn(4, 5, 5))  # plain TuckerConv2d accepts (C, H, W)


def test_nan_input_propagates_like_the_reference(kernel_only: None) -> None:
    if not kernel_available():
        pytest.skip("fused kernel unavailable")
    layer = FusedTuckerConv2d(4, 6, 3, ranks=(3, 2), padding=1, relu=True).eval()
    x = torch.full((1, 4, 5, 5), float("nan"))
    with torch.no_grad():
        assert bool(reference_of(layer, x).isnan().all())
        assert bool(layer(x).isnan().all())


# --------------------------------------------------------------------------- 6. compile, opcheck


class TwoFused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = FusedTuckerConv2d(4, 8, 3, ranks=(4, 3), padding=1, relu=True)
        self.b = FusedTuckerConv2d(8, 8, 3, ranks=(5, 4), padding=1, relu=True, residual=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.b(y, y)


def _compile(model: nn.Module, x: torch.Tensor, backend, fullgraph: bool) -> torch.Tensor:
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            return torch.compile(model, backend=backend, fullgraph=fullgraph)(x)
    finally:
        torch._dynamo.reset()


def _recording_backend(graphs: list[torch.fx.GraphModule]):
    def backend(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend


@pytest.mark.parametrize("fullgraph", [False, True])
def test_torch_compile_matches_eager_and_calls_the_custom_op(fullgraph: bool) -> None:
    model = TwoFused().eval()
    x = torch.randn(2, 4, 7, 9)
    with torch.no_grad():
        expected = model(x)
    graphs: list[torch.fx.GraphModule] = []
    got = _compile(model, x, _recording_backend(graphs), fullgraph=fullgraph)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(
        _compile(model, x, "aot_eager", fullgraph=fullgraph), expected, atol=1e-6, rtol=1e-6
    )
    assert len(graphs) == 1  # one graph, no break around the fused layers
    targets = [n.target for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.slimtorch.tucker_block.default) == 2
    assert torch.nn.functional.conv2d not in targets


def test_torch_export_under_no_grad_matches_eager() -> None:
    model = TwoFused().eval()
    x = torch.randn(2, 4, 7, 9)
    with torch.no_grad():
        expected = model(x)
        program = torch.export.export(model, (x,))
        got = program.module()(x)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_torch_export_under_no_grad_holds_the_custom_op() -> None:
    model = TwoFused().eval()
    x = torch.randn(2, 4, 7, 9)
    with torch.no_grad():
        program = torch.export.export(model, (x,))
    ops = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert ops.count("slimtorch.tucker_block.default") == 2
    assert "aten.conv2d.default" not in ops


def test_saved_program_loads_in_a_fresh_process(tmp_path: Path) -> None:
    import subprocess
    import sys

    from slimtorch.models import save_exported

    model = TwoFused().eval()
    x = torch.randn(2, 4, 7, 9)
    path = save_exported(model, x, tmp_path / "fused.pt2")
    torch.save({"x": x, "y": model(x).detach()}, tmp_path / "io.pt")
    code = (
        "import sys, torch; from slimtorch.models import load_exported; "
        "m = load_exported(sys.argv[1]); io = torch.load(sys.argv[2]); "
        "torch.testing.assert_close(m(io['x']), io['y'], atol=1e-5, rtol=1e-5)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "io.pt")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_flop_counter_sees_the_factor_convolutions() -> None:
    plain = make_tucker(8, 16, 3, (6, 4), padding=1, stride=2)
    layer = FusedTuckerConv2d.from_tucker(plain, relu=True).eval()
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        with FlopCounterMode(display=False) as plain_count:
            plain(x)
        with FlopCounterMode(display=False) as fused_count:
            y = layer(x)
    assert fused_count.get_total_flops() == plain_count.get_total_flops() > 0
    assert plain_count.get_total_flops() == 2 * plain.flops((9, 9))
    torch.testing.assert_close(y, torch.relu(plain(x)), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(("use_residual", "relu", "stride"), [(False, False, 1), (True, True, 2)])
def test_opcheck(use_residual: bool, relu: bool, stride: int) -> None:
    x = torch.randn(2, 3, 7, 6)
    u, k, v, b = torch.randn(2, 3), torch.randn(4, 2, 3, 3), torch.randn(5, 4), torch.randn(5)
    out = (7 + 2 - 3) // stride + 1, (6 + 2 - 3) // stride + 1
    res = torch.randn(2, 5, *out) if use_residual else None
    args = (x, u, k, v, b, res, [stride, stride], [1, 1], [1, 1], relu)
    result = torch.library.opcheck(tucker_block, args)
    assert result and all(v == "SUCCESS" for v in result.values()), result
    y = tucker_block(*args)
    assert y.shape == (2, 5, *out)
    torch.testing.assert_close(y, _reference(*args), atol=ATOL, rtol=RTOL)


# --------------------------------------------------------------------------- 7. fuse_tucker_


def _randomise_batch_norms(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(7)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)


@pytest.fixture(scope="module")
def _decomposed_resnet() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = create_model("resnet20", in_channels=1, input_size=28).eval()
    _randomise_batch_norms(model)
    decompose_(model, TuckerConfig(rank=0.25), include=["layer*"])
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        before = model(x)
    return model, x, before


@pytest.fixture
def resnet(_decomposed_resnet) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A Tucker-decomposed resnet20 (eval, non-trivial batch norms, a fresh copy per test), an
    input, and its output before fusing."""
    model, x, before = _decomposed_resnet
    model = copy.deepcopy(model)
    assert model.slimtorch_arch["transforms"][-1]["name"] == "decompose.layers"
    return model, x, before


BLOCKS = [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]


def test_fuse_resnet20_keeps_outputs_and_takes_in_bn_relu_residual(resnet) -> None:
    model, x, before = resnet
    report = fuse_tucker_(model)
    assert isinstance(report, FuseReport)
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, atol=ATOL, rtol=RTOL)

    rows = {r.conv: r for r in report.rows}
    assert len(report.rows) == len(report.lowered) == 20
    assert all(r.action == "fused" for r in report.rows)
    assert sum(r.residual for r in report.rows) == 9
    for blk in BLOCKS:
        r1, r2 = rows[f"{blk}.conv1"], rows[f"{blk}.conv2"]
        assert (r1.bn, r1.relu, r1.residual) == (f"{blk}.bn1", f"{blk}.relu1", False)
        assert (r2.bn, r2.relu, r2.residual) == (f"{blk}.bn2", f"{blk}.relu2", True)
        assert r2.relu.endswith(".relu2")
        block = model.get_submodule(blk)
        for name in ("bn1", "relu1", "bn2", "relu2"):
            assert type(getattr(block, name)) is nn.Identity, f"{blk}.{name}"
        assert isinstance(block.conv1, FusedTuckerConv2d) and block.conv1.relu
        assert not block.conv1.adds_residual
        assert isinstance(block.conv2, FusedTuckerConv2d) and block.conv2.relu
        assert block.conv2.adds_residual
    for blk in ("layer2.0", "layer3.0"):
        row = rows[f"{blk}.shortcut.0"]
        assert (row.bn, row.relu, row.residual) == (f"{blk}.shortcut.1", None, False)
        shortcut = model.get_submodule(f"{blk}.shortcut")
        assert isinstance(shortcut[0], FusedTuckerConv2d) and not shortcut[0].relu
        assert type(shortcut[1]) is nn.Identity
    # the stem is not decomposed and stays as it was
    assert type(model.conv1) is nn.Conv2d and type(model.bn1) is nn.BatchNorm2d

    assert report.kernel == native.kernel_status().detail
    assert report.entry == model.slimtorch_arch["transforms"][-1]
    assert report.entry["name"] == TRANSFORM_NAME
    assert len(report.entry["params"]["layers"]) == 20
    as_dict = report.to_dict()
    assert as_dict["kernel"] == report.kernel and as_dict["lowered"] == 20
    assert as_dict["skipped"] == 0
    table = report.to_table()
    assert "layer1.0.conv2" in table and "layer1.0.relu2" in table


def test_fuse_resnet20_twice_is_a_no_op(resnet) -> None:
    model, x, before = resnet
    fuse_tucker_(model)
    n_transforms = len(model.slimtorch_arch["transforms"])
    again = fuse_tucker_(model)
    assert again.rows == [] and again.entry is None
    assert len(model.slimtorch_arch["transforms"]) == n_transforms
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=ATOL, rtol=RTOL)


def test_fuse_include_exclude_globs(resnet) -> None:
    model, x, before = resnet
    report = fuse_tucker_(model, include=["layer1.*"], exclude=["layer1.2.*"])
    assert sorted(r.conv for r in report.rows) == [
        "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2",
    ]  # fmt: skip
    assert isinstance(model.layer1[0].conv2, FusedTuckerConv2d)
    assert type(model.layer1[2].conv1) is TuckerConv2d
    assert type(model.layer1[2].bn1) is nn.BatchNorm2d
    assert type(model.layer2[0].conv2) is TuckerConv2d
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=ATOL, rtol=RTOL)
    rest = fuse_tucker_(model, exclude=["layer3.*"])
    assert len(rest.rows) == 2 + 7  # layer1.2 and layer2 (with its shortcut)
    assert type(model.layer3[0].conv1) is TuckerConv2d
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=ATOL, rtol=RTOL)
    names = [t["name"] for t in model.slimtorch_arch["transforms"]]
    assert names.count(TRANSFORM_NAME) == 2
    with pytest.raises(ValueError, match="match no module"):
        fuse_tucker_(model, include=["nothing.*"])
    with pytest.raises(TypeError, match="list of glob strings"):
        fuse_tucker_(model, include="layer1.*")  # type: ignore[arg-type]


def _seq_with_same_padding() -> nn.Sequential:
    torch.manual_seed(3)
    model = nn.Sequential(
        TuckerConv2d(4, 8, 3, (3, 3), padding="same"),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        TuckerConv2d(8, 8, 3, (4, 4), padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
    ).eval()
    _randomise_batch_norms(model)
    return model


def test_fuse_skips_string_padding_and_fuses_the_rest() -> None:
    model = _seq_with_same_padding()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        before = model(x)
    report = fuse_tucker_(model)
    rows = {r.conv: r for r in report.rows}
    assert rows["0"].action == "skipped" and "padding='same'" in rows["0"].reason
    assert (rows["3"].action, rows["3"].bn, rows["3"].relu) == ("fused", "4", "5")
    assert rows["3"].residual is False
    assert type(model[0]) is TuckerConv2d and type(model[1]) is nn.BatchNorm2d
    assert isinstance(model[3], FusedTuckerConv2d)
    assert type(model[4]) is nn.Identity and type(model[5]) is nn.Identity
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=ATOL, rtol=RTOL)


def test_fuse_strict_raises_and_leaves_the_model_unchanged() -> None:
    model = _seq_with_same_padding()
    state = copy.deepcopy(model.state_dict())
    types = [type(m) for m in model]
    with pytest.raises(TransformSkipError, match=r"0: padding='same'"):
        fuse_tucker_(model, strict=True)
    assert [type(m) for m in model] == types
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    # strict passes when the skipped layer is not considered
    report = fuse_tucker_(model, exclude=["0"], strict=True)
    assert [r.conv for r in report.rows] == ["3"]


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = TuckerConv2d(4, 4, 3, (2, 2), padding=1)
        self.bn = nn.BatchNorm2d(4, track_running_stats=False)
        self.conv_b = TuckerConv2d(4, 4, 3, (2, 2), padding=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv_b(self.conv(self.conv(x)))))


def test_fuse_skip_reasons_for_reused_conv_and_stateless_batch_norm() -> None:
    torch.manual_seed(5)
    model = CalledTwice().eval()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        before = model(x)
    report = fuse_tucker_(model)
    rows = {r.conv: r for r in report.rows}
    assert rows["conv"].action == "skipped" and "called 2 times" in rows["conv"].reason
    row = rows["conv_b"]
    assert row.action == "fused" and row.bn is None and row.relu is None
    assert "tracks no running statistics" in row.reason
    assert type(model.bn) is nn.BatchNorm2d and type(model.relu) is nn.ReLU
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=ATOL, rtol=RTOL)
    with pytest.raises(TransformSkipError, match="called 2 times"):
        fuse_tucker_(CalledTwice().eval(), strict=True)


def test_fuse_rejects_non_modules() -> None:
    with pytest.raises(TypeError, match=r"must be an nn\.Module"):
        fuse_tucker_(lambda x: x)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- 8. save / load


def test_save_load_roundtrip_rebuilds_fused_layers(resnet, tmp_path: Path) -> None:
    model, x, before = resnet
    fuse_tucker_(model)
    with torch.no_grad():
        fused_out = model(x)
    path = save_model(
        model,
        tmp_path / "fused",
        input_shape=(1, 28, 28),
        mean=[0.5],
        std=[0.5],
        class_names=[str(i) for i in range(10)],
    )
    loaded, card = load_model(path)
    assert card.input_shape == (1, 28, 28) and not loaded.training
    original = dict(model.named_modules())
    n_fused = 0
    for name, mod in loaded.named_modules():
        if isinstance(mod, FusedTuckerConv2d):
            n_fused += 1
            src = original[name]
            assert isinstance(src, FusedTuckerConv2d)
            assert (mod.relu, mod.adds_residual, mod.ranks) == (
                src.relu, src.adds_residual, src.ranks,
            )  # fmt: skip
        else:
            assert type(mod) is type(original[name]), name
    assert n_fused == 20
    assert type(loaded.layer1[0].bn2) is nn.Identity
    with torch.no_grad():
        out = loaded(x)
    torch.testing.assert_close(out, fused_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out, before, atol=ATOL, rtol=RTOL)


def test_replay_rejects_malformed_params() -> None:
    model = nn.Sequential(TuckerConv2d(4, 4, 3, (2, 2)))
    with pytest.raises(ValueError, match="'layers' list"):
        fused._replay(model, {})
    with pytest.raises(ValueError, match="malformed layer entry"):
        fused._replay(model, {"layers": [{"conv": "0"}]})
    with pytest.raises(ValueError, match="expected a TuckerConv2d"):
        fused._replay(
            nn.Sequential(nn.Conv2d(4, 4, 3)),
            {"layers": [{"conv": "0", "bn": None, "relu": None, "residual": False}]},
        )


# --------------------------------------------------------------------------- 9. native build


def _needs_cc() -> None:
    if shutil.which("cc") is None:
        pytest.skip("no C compiler 'cc' on PATH")


def test_second_load_reuses_the_cached_library(fresh_native: pytest.MonkeyPatch) -> None:
    status = native.kernel_status()
    if not status.available:
        pytest.skip(f"fused kernel unavailable: {status.detail}")
    lib = Path(status.detail)
    assert lib.parent == native.cache_dir() and lib.name.startswith("tucker_block-")
    mtime = lib.stat().st_mtime_ns
    native._load_once.cache_clear()
    assert native.kernel_status() == status
    source = (Path(native.__file__).parent / "kernels" / native.SOURCE).read_bytes()
    cc = os.environ.get("SLIMTORCH_CC", "cc")
    assert native._build(source, cc, lib.parent) == lib
    assert lib.stat().st_mtime_ns == mtime  # not rebuilt


def test_cache_dir_honours_env(fresh_native: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fresh_native.setenv("SLIMTORCH_CACHE", str(tmp_path / "cache"))
    assert native.cache_dir() == tmp_path / "cache" / "native"
    fresh_native.delenv("SLIMTORCH_CACHE")
    fresh_native.setenv("HOME", str(tmp_path / "home"))
    assert native.cache_dir() == tmp_path / "home" / ".cache" / "slimtorch" / "native"


def test_build_into_a_fresh_cache_dir(fresh_native: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if not kernel_available():
        pytest.skip(f"fused kernel unavailable: {native.kernel_status().detail}")
    fresh_native.setenv("SLIMTORCH_CACHE", str(tmp_path))
    native._load_once.cache_clear()
    status = native.kernel_status()  # compiles once more
    assert status.available, status.detail
    lib = Path(status.detail)
    assert lib.parent == tmp_path / "native" and lib.is_file()
    assert [p.name for p in (tmp_path / "native").iterdir()] == [lib.name]  # no temp leftovers
    mtime = lib.stat().st_mtime_ns
    layer, x, res, expected = _sample_layer()
    with torch.no_grad():
        torch.testing.assert_close(layer(x, res), expected, atol=ATOL, rtol=RTOL)
    native._load_once.cache_clear()
    assert native.kernel_status() == status
    assert lib.stat().st_mtime_ns == mtime


def _script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def test_compiler_that_always_fails(fresh_native: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cc = _script(tmp_path, "badcc", "echo 'broken compiler' >&2\nexit 1\n")
    fresh_native.setenv("SLIMTORCH_CC", str(cc))
    fresh_native.setenv("SLIMTORCH_CACHE", str(tmp_path / "cache"))
    native._load_once.cache_clear()
    status = native.kernel_status()
    assert status.available is False
    assert "C compiler" in status.detail and str(cc) in status.detail
    assert "broken compiler" in status.detail
    assert native.kernel() is None
    layer, x, res, expected = _sample_layer()
    with torch.no_grad():
        torch.testing.assert_close(layer(x, res), expected, atol=ATOL, rtol=RTOL)


def test_compile_errors_are_reported(fresh_native: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cc = _script(
        tmp_path,
        "failcc",
        'if [ "$1" = --version ]; then echo "failcc 1.0"; exit 0; fi\n'
        "echo 'boom: cannot compile' >&2\nexit 1\n",
    )
    fresh_native.setenv("SLIMTORCH_CC", str(cc))
    fresh_native.setenv("SLIMTORCH_CACHE", str(tmp_path / "cache"))
    native._load_once.cache_clear()
    status = native.kernel_status()
    assert status.available is False
    assert "compiling the fused Tucker kernel failed" in status.detail
    assert status.detail.count("boom: cannot compile") == len(native.FLAG_SETS)
    assert "-march=native" in status.detail
    leftovers = list((tmp_path / "cache" / "native").iterdir())
    assert leftovers == []  # no library, no temp folders


def test_library_without_the_symbol(fresh_native: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _needs_cc()
    cc = _script(
        tmp_path,
        "emptycc",
        'if [ "$1" = --version ]; then exec cc --version; fi\n'
        'for a; do out="$a"; done\n'
        "echo 'int unrelated;' | cc -shared -fPIC -x c - -o \"$out\"\n",
    )
    fresh_native.setenv("SLIMTORCH_CC", str(cc))
    fresh_native.setenv("SLIMTORCH_CACHE", str(tmp_path / "cache"))
    native._load_once.cache_clear()
    status = native.kernel_status()
    assert status.available is False
    assert native.SYMBOL in status.detail


def test_a_quantized_tucker_layer_is_skipped_with_its_reason() -> None:
    # Tucker -> quantize_ -> fuse_tucker_ failed with AttributeError: 'QDQConv2d' object has
    # no attribute 'weight'
    from slimtorch.quant import PTQConfig, quantize_

    torch.manual_seed(0)
    model = create_model("resnet20", in_channels=1, input_size=28).eval()
    decompose_(model, TuckerConfig(rank=0.5), include=["layer1.0.conv1"])
    quantize_(model, PTQConfig(mode="weight_only"))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        before = model(x)
    report = fuse_tucker_(model)
    assert [(r.conv, r.action) for r in report.rows] == [("layer1.0.conv1", "skipped")]
    assert "QDQConv2d" in str(report.rows[0].reason)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)
    with pytest.raises(TransformSkipError, match="fuse, then quantize"):
        fuse_tucker_(model, strict=True)


def test_a_build_sweeps_what_a_killed_build_left(
    fresh_native: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if not kernel_available():
        pytest.skip(f"fused kernel unavailable: {native.kernel_status().detail}")
    fresh_native.setenv("SLIMTORCH_CACHE", str(tmp_path))
    native._load_once.cache_clear()
    lib = Path(native.kernel_status().detail)
    lib.unlink()
    killed = lib.parent / f".{lib.name}.999999999.0123abcd.tmp"  # a dead process's build folder
    killed.mkdir()
    (killed / native.SOURCE).write_text("/* half written */")
    native._load_once.cache_clear()
    assert native.kernel_status().available
    assert [p.name for p in lib.parent.iterdir()] == [lib.name]
