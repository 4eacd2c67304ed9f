"""The fused Tucker-2 CUDA kernel: its tiling plan (any machine) and its outputs (GPU tests)."""

from __future__ import annotations

import copy
import itertools
import re

import pytest
import torch

from fused_helpers import reference_of
from slimtorch.decompose import (
    FusedTuckerConv2d,
    TuckerConfig,
    TuckerConv2d,
    cuda_kernel,
    decompose_,
    fuse_tucker_,
    fused,
    fused_op,
)
from slimtorch.decompose.cuda_kernel import SHARED_LIMIT, plan_launch
from slimtorch.models import create_model

# --------------------------------------------------------------------------- the plan (CPU)

PLAN_SHAPES = [
    # c, r1, r2, co, kernel, stride, dilation, out_hw
    (16, 4, 4, 16, (3, 3), (1, 1), (1, 1), (28, 28)),
    (16, 4, 8, 32, (3, 3), (2, 2), (1, 1), (14, 14)),
    (64, 16, 16, 64, (3, 3), (1, 1), (1, 1), (7, 7)),
    (6, 5, 3, 10, (3, 5), (1, 2), (2, 1), (1, 1)),
    (96, 24, 24, 96, (3, 3), (1, 1), (1, 1), (8, 8)),
    (3, 1, 1, 3, (1, 1), (1, 1), (1, 1), (100, 300)),
]


@pytest.mark.parametrize("shape", PLAN_SHAPES)
def test_plan_covers_the_map_within_shared_memory(shape) -> None:
    c, r1, r2, co, kernel, stride, dilation, out_hw = shape
    plan = plan_launch(
        c=c, r1=r1, r2=r2, co=co, kernel=kernel, stride=stride, dilation=dilation,
        out_hw=out_hw,
    )  # fmt: skip
    assert plan is not None
    assert plan.rows * plan.tiles >= out_hw[0] > plan.rows * (plan.tiles - 1)
    assert plan.threads % 32 == 0 and 32 <= plan.threads <= 1024
    assert plan.shared_bytes <= SHARED_LIMIT
    # one thread per output pixel of the block (up to the 1024-thread limit)
    assert plan.threads >= min(1024, plan.rows * out_hw[1] * plan.images)


def test_plan_groups_small_maps_and_bands_large_ones() -> None:
    small = plan_launch(
        c=64, r1=16, r2=16, co=64, kernel=(3, 3), stride=(1, 1), dilation=(1, 1), out_hw=(7, 7)
    )
    assert small is not None and small.images > 1 and small.rows == 7 and small.tiles == 1
    large = plan_launch(
        c=16, r1=4, r2=4, co=16, kernel=(3, 3), stride=(1, 1), dilation=(1, 1), out_hw=(28, 28)
    )
    assert large is not None and large.images == 1 and large.tiles == 4 and large.rows == 7


def test_small_batch_plan_splits_pixels_only_where_the_ranks_allow() -> None:
    kw = dict(kernel=(3, 3), stride=(1, 1), dilation=(1, 1))
    one = plan_launch(c=64, r1=16, r2=16, co=64, out_hw=(7, 7), **kw)
    four = plan_launch(c=64, r1=16, r2=16, co=64, out_hw=(7, 7), split=4, **kw)
    assert one is not None and four is not None
    # one image a block, 49 pixels padded to 64 threads, times 4; room for the core outputs
    assert four.images == 1 and four.threads == 4 * 64 and four.tiles == 1
    per_image_one = one.shared_bytes - 4 * (one.images - 1) * 16 * 9 * 9
    assert four.shared_bytes == per_image_one + 4 * 49 * 16
    two = plan_launch(c=32, r1=8, r2=8, co=32, out_hw=(14, 14), split=2, **kw)
    assert two is not None and two.threads == 2 * 224 and two.rows == 14
    # rank 4 is one float4: nothing to split; 4 does not divide rank 8's two float4s
    assert plan_launch(c=16, r1=4, r2=4, co=16, out_hw=(28, 28), split=2, **kw) is None
    assert plan_launch(c=32, r1=8, r2=8, co=32, out_hw=(14, 14), split=4, **kw) is None
    assert plan_launch(c=64, r1=16, r2=16, co=66, out_hw=(7, 7), split=4, **kw) is None
    # bands keep every block within 1024 threads
    big = plan_launch(c=64, r1=16, r2=16, co=64, out_hw=(28, 28), split=4, **kw)
    assert big is not None and big.threads <= 1024 and big.tiles > 1


def test_plan_shrinks_the_tile_to_fit_and_gives_up_when_nothing_fits() -> None:
    kw = dict(c=64, r1=16, r2=16, co=64, kernel=(3, 3), stride=(1, 1), dilation=(1, 1))
    roomy = plan_launch(**kw, out_hw=(7, 7))
    tight = plan_launch(**kw, out_hw=(7, 7), shared_limit=24 * 1024)
    assert roomy is not None and tight is not None
    assert tight.images < roomy.images and tight.shared_bytes <= 24 * 1024
    # the weights alone need more than 4 KB
    assert plan_launch(**kw, out_hw=(7, 7), shared_limit=4096) is None
    # a wide layer's factors (1.1 MB) never fit: it stays with the library convolutions
    wide = dict(c=512, r1=128, r2=128, co=512, kernel=(3, 3), stride=(1, 1), dilation=(1, 1))
    assert plan_launch(**wide, out_hw=(4, 4)) is None


def test_launcher_is_none_without_cuda_or_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    args = (0, (16, 28, 28), 4, (4, 4, 3, 3), 16, (1, 1), (1, 1), (1, 1), (28, 28), True, True)
    monkeypatch.setenv("SLIMTORCH_NO_NATIVE", "1")
    cuda_kernel.launcher.cache_clear()
    try:
        assert cuda_kernel.launcher(*args) is None
        assert cuda_kernel.cuda_status() == "disabled by SLIMTORCH_NO_NATIVE"
        monkeypatch.delenv("SLIMTORCH_NO_NATIVE")
        if torch.version.cuda is None:
            assert cuda_kernel.launcher(*args) is None
            assert cuda_kernel.cuda_status() == "not a CUDA build of PyTorch"
    finally:
        cuda_kernel.launcher.cache_clear()


def test_a_missing_nvrtc_library_falls_back_instead_of_failing_the_forward(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # torch raises OSError("Could not find any NVRTC library"), which escaped the build's
    # RuntimeError handler into the layer's forward pass
    import contextlib

    def no_nvrtc(*args: object, **kwargs: object) -> None:
        raise OSError("Could not find any NVRTC library")

    monkeypatch.setattr(cuda_kernel, "_disabled_reason", lambda: None)
    monkeypatch.setattr(cuda_kernel, "_pdl_supported", lambda device: False)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "_compile_kernel", no_nvrtc, raising=False)
    monkeypatch.setattr(cuda_kernel, "_failed", {})
    shape = ((16, 28, 28), 4, (4, 4, 3, 3), 16, (1, 1), (1, 1), (1, 1), (28, 28), True, True)
    assert cuda_kernel._build(0, shape, 1) is None
    assert "NVRTC" in next(iter(cuda_kernel._failed.values()))


def test_fuse_report_names_the_kernel_of_the_models_device(monkeypatch: pytest.MonkeyPatch) -> None:
    # on ROCm (and any GPU) it reported the CPU's C kernel as available and warned of nothing,
    # while the fused layers ran library convolutions
    monkeypatch.setattr(torch.version, "cuda", None)  # a ROCm build
    status = fused._kernel_status(torch.device("cuda:0"))
    assert not status.available and status.detail == "CUDA kernel: not a CUDA build of PyTorch"
    assert not fused._kernel_status(torch.device("mps")).available


def test_source_uses_every_constant_the_launcher_defines() -> None:
    source = cuda_kernel._source()
    assert 'extern "C" __global__' in source and cuda_kernel.SYMBOL in source
    code = "\n".join(ln for ln in source.splitlines() if not ln.lstrip().startswith("//"))
    for name in ("C", "R1", "R2", "CO", "KH", "KW", "SH", "SW", "PH", "PW", "DH", "DW", "H", "W",
                 "HO", "WO", "TH", "NIMG", "RELU", "RES", "NTHREADS", "R1P", "R2P"):  # fmt: skip
        assert re.search(rf"\b{name}\b", code), name


# --------------------------------------------------------------------------- on a GPU

GPU_SHAPES = [
    # c, co, ranks (r2, r1), kernel, stride, padding, dilation, h, w
    (16, 16, (4, 4), 3, 1, 1, 1, 28, 28),
    (16, 32, (8, 4), 3, 2, 1, 1, 28, 28),
    (32, 32, (8, 8), 3, 1, 1, 1, 14, 14),
    (64, 64, (16, 16), 3, 1, 1, 1, 7, 7),
    (32, 64, (16, 8), 3, 2, 1, 1, 14, 14),
    (8, 12, (8, 8), (3, 5), (1, 2), (2, 1), (2, 1), 11, 9),
    (6, 10, (3, 5), (3, 5), (1, 2), (2, 1), (2, 1), 11, 9),
    (17, 9, (9, 16), 3, 1, 0, 1, 7, 9),
    (5, 7, (1, 1), 1, 1, 0, 1, 5, 4),
    (3, 16, (2, 3), 5, 2, 2, 1, 33, 31),
]


def _layer(shape, relu: bool, residual: bool, seed: int) -> FusedTuckerConv2d:
    c, co, ranks, kernel, stride, padding, dilation, _, _ = shape
    torch.manual_seed(seed)
    plain = TuckerConv2d(
        c, co, kernel, ranks, stride=stride, padding=padding, dilation=dilation, bias=True
    )
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0, 0.3)
    return FusedTuckerConv2d.from_tucker(plain, relu=relu, residual=residual).eval().cuda()


@pytest.fixture
def exact_convolutions():
    """Library convolutions in full float32 (no TF32) for the reference outputs."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


@pytest.fixture
def kernel_only(monkeypatch: pytest.MonkeyPatch):
    """Fail if the fused layer falls back to library convolutions; yields the reference."""

    def no_fallback(*args, **kwargs):
        raise AssertionError("the fused layer used the library-convolution fallback")

    monkeypatch.setattr(fused_op, "reference", no_fallback)
    monkeypatch.setattr(fused, "reference", no_fallback)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("n", [1, 3, 37])
def test_cuda_kernel_matches_library_convolutions(exact_convolutions, shape, n) -> None:
    c, _, *_, h, w = shape
    for i, (relu, residual) in enumerate(itertools.product((False, True), repeat=2)):
        layer = _layer(shape, relu, residual, seed=i)
        x = torch.randn(n, c, h, w, device="cuda")
        with torch.no_grad():
            shape_out = reference_of(layer, x, None).shape
            res = torch.randn(shape_out, device="cuda") if residual else None
            expected = reference_of(layer, x, res)
            got = layer(x, res) if residual else layer(x)
            via_op = fused_op.tucker_block(
                x, layer.first.weight.flatten(1), layer.core.weight,
                layer.last.weight.flatten(1), layer.last.bias, res,
                list(layer.core.stride), list(layer.core.padding), list(layer.core.dilation),
                relu,
            )  # fmt: skip
        assert got.shape == expected.shape and got.is_cuda
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(via_op, got, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("split", [1, 2, 4])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_every_form_of_the_kernel_matches_library_convolutions(
    exact_convolutions, shape, split
) -> None:
    # the small-batch forms (several threads per output pixel) against cuDNN, forced
    c, co, *_, h, w = shape
    layer = _layer(shape, relu=True, residual=True, seed=11)
    x = torch.randn(3, c, h, w, device="cuda")
    out_hw = tuple(layer.core(layer.first(x[:1])).shape[2:])
    res = torch.randn(3, co, *out_hw, device="cuda")
    k = layer.core.weight
    run = cuda_kernel.launcher(
        0, (c, h, w), k.shape[1], tuple(k.shape), co, tuple(layer.core.stride),
        tuple(layer.core.padding), tuple(layer.core.dilation), out_hw, True, True, split,
    )  # fmt: skip
    plan = plan_launch(
        c=c, r1=k.shape[1], r2=k.shape[0], co=co, kernel=tuple(k.shape[2:]),
        stride=layer.core.stride, dilation=layer.core.dilation, out_hw=out_hw, split=split,
    )  # fmt: skip
    assert (run is None) == (plan is None)
    if run is None:  # no such form for these ranks: the caller keeps one thread a pixel
        assert split > 1
        return
    with torch.no_grad():
        got = run(x, layer.first.weight, k, layer.last.weight, layer.last.bias, res)
        want = reference_of(layer, x, res)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_cuda_kernel_runs_without_fallback(kernel_only) -> None:
    assert cuda_kernel.cuda_status().startswith("available")
    layer = _layer(GPU_SHAPES[0], relu=True, residual=True, seed=0)
    x = torch.randn(2, 16, 28, 28, device="cuda")
    with torch.no_grad():
        y = layer(x, x)
    assert y.shape == (2, 16, 28, 28) and bool((y >= 0).all())


@pytest.mark.gpu
def test_cuda_non_contiguous_empty_and_nan(exact_convolutions) -> None:
    layer = _layer(GPU_SHAPES[2], relu=True, residual=True, seed=3)
    x = torch.randn(4, 14, 14, 32, device="cuda").permute(0, 3, 1, 2)  # channels-last strides
    res = torch.randn(4, 14, 14, 32, device="cuda").permute(0, 3, 1, 2)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, res), reference_of(layer, x, res), atol=1e-4,
                                   rtol=1e-4)  # fmt: skip
        assert layer(x[:0], res[:0]).shape == (0, 32, 14, 14)
        nan = torch.full((1, 32, 14, 14), float("nan"), device="cuda")
        assert bool(layer(nan, torch.zeros_like(nan)).isnan().all())


@pytest.mark.gpu
def test_cuda_float16_and_gradients_use_library_convolutions() -> None:
    layer = _layer(GPU_SHAPES[0], relu=False, residual=False, seed=4)
    x = torch.randn(2, 16, 28, 28, device="cuda")
    with torch.no_grad():
        half = copy.deepcopy(layer).half()(x.half())
    assert half.dtype == torch.float16
    x.requires_grad_(True)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.gpu
def test_cuda_autocast_runs_the_float32_kernel(kernel_only) -> None:
    layer = _layer(GPU_SHAPES[0], relu=True, residual=True, seed=5)
    x = torch.randn(3, 16, 28, 28, device="cuda").bfloat16()
    res = torch.randn(3, 16, 28, 28, device="cuda")
    with torch.no_grad():
        want = layer(x.float(), res)
        want_half_residual = layer(x.float(), res.bfloat16().float())
        with torch.autocast("cuda", torch.bfloat16):
            got = layer(x, res.bfloat16())
            got_fp32_residual = layer(x, res)
    assert got.dtype == got_fp32_residual.dtype == torch.float32
    torch.testing.assert_close(got_fp32_residual, want, atol=0, rtol=0)
    torch.testing.assert_close(got, want_half_residual, atol=0, rtol=0)


@pytest.mark.gpu
def test_cuda_graph_and_compile_match_eager() -> None:
    layer = _layer(GPU_SHAPES[1], relu=True, residual=False, seed=5)
    x = torch.randn(8, 16, 28, 28, device="cuda")
    with torch.no_grad():
        eager = layer(x)
        static_x = x.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                layer(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
        static_x.copy_(x * 2)
        graph.replay()
        torch.testing.assert_close(static_y, layer(x * 2), atol=0, rtol=0)
        torch._dynamo.reset()
        compiled = torch.compile(layer)(x)
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_fused_resnet20_on_cuda_matches_the_factorised_model(exact_convolutions) -> None:
    net = create_model("resnet20", in_channels=1, input_size=28).eval()
    decompose_(net, TuckerConfig(rank=0.25), include=["layer*"])
    net = net.cuda()
    x = torch.randn(5, 1, 28, 28, device="cuda")
    with torch.no_grad():
        before = net(x)
        fuse_tucker_(net)
        after = net(x)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
