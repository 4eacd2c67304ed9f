"""Direct few-tap convolutions: exact against nn.Conv2d, pool fusion, skips, save/load, compile."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from slimtorch.core.errors import TransformSkipError
from slimtorch.models import create_model, load_model, save_model
from slimtorch.quant.direct import DirectConv2d, DirectConvConfig, lower_direct_conv_


def _with_bn_stats(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Non-trivial running statistics, and batch-norm scales of both signs (the max must be
    taken after the scale: a negative scale turns a max into a min)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 1.0
            with torch.no_grad():
                m.weight.uniform_(-1.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


@pytest.mark.parametrize(
    ("c_in", "kernel", "stride", "padding", "dilation", "bias"),
    [
        (1, 3, 1, 1, 1, False),
        (3, 3, 2, 1, 1, True),
        (2, (3, 5), (1, 2), (0, 2), 1, True),
        (1, 3, 1, 2, 2, True),
        (1, 5, 1, "valid", 1, False),
    ],
)
def test_direct_conv_equals_conv2d(c_in, kernel, stride, padding, dilation, bias) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, 7, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias)
    x = torch.randn(3, c_in, 13, 12, dtype=torch.float64)
    for channels_last in (False, True):
        direct = DirectConv2d.from_conv(conv, channels_last=channels_last).double()
        out = direct(x)
        torch.testing.assert_close(out, conv.double()(x), rtol=1e-12, atol=1e-12)
        assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert direct.taps == conv.weight[0].numel()


@pytest.mark.parametrize(("pool", "stride", "size"), [(2, 1, 28), (3, 1, 17), (2, 2, 15)])
def test_pool_and_relu_fold_into_the_direct_conv(pool: int, stride: int, size: int) -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 5, 3, stride=stride, padding=1).double()
    x = torch.randn(2, 2, size, size + 3, dtype=torch.float64)
    ref = nn.functional.max_pool2d(torch.relu(conv(x)), pool)
    for channels_last in (False, True):
        direct = DirectConv2d.from_conv(conv, pool=pool, relu=True, channels_last=channels_last)
        torch.testing.assert_close(direct(x), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pool", [None, 2])
def test_counters_see_a_convolution(pool: int | None) -> None:
    # its slices-times-weights products were counted as elementwise ops: the reported GFLOPs
    # fell by the stem's share after lowering
    from slimtorch.core.measure import count_flops

    torch.manual_seed(2)
    conv = nn.Conv2d(1, 6, 3, padding=1)
    ref = nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(pool)) if pool else conv
    x = torch.randn(2, 1, 12, 12)
    want = count_flops(ref, x)
    for channels_last in (False, True):
        direct = DirectConv2d.from_conv(
            conv, pool=pool, relu=bool(pool), channels_last=channels_last
        )
        got = count_flops(direct, x)
        assert got.total_flops == want.total_flops == 2 * 6 * 12 * 12 * 9 * 2
        assert got.elementwise_flops <= want.elementwise_flops + 6 * 12 * 12 * 2
        out = direct(x)  # and computes as before outside the counters
        torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-5)
        assert out.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_gradients_match_conv2d() -> None:
    torch.manual_seed(2)
    conv = nn.Conv2d(1, 4, 3, padding=1).double()
    direct = DirectConv2d.from_conv(conv).double()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    conv(x).square().sum().backward()
    direct(x).square().sum().backward()
    assert conv.weight.grad is not None and direct.weight.grad is not None
    torch.testing.assert_close(direct.weight.grad, conv.weight.grad)


def test_bad_input_and_unlowerable_layers_are_refused() -> None:
    direct = DirectConv2d.from_conv(nn.Conv2d(1, 4, 3, padding=1), pool=2)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        direct(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="too small"):
        direct(torch.randn(2, 1, 1, 1))
    with pytest.raises(ValueError, match="groups=2"):
        DirectConv2d.from_conv(nn.Conv2d(2, 4, 3, groups=2))
    with pytest.raises(ValueError, match="padding_mode"):
        DirectConv2d.from_conv(nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="'same'"):
        DirectConv2d.from_conv(nn.Conv2d(1, 4, 3, padding="same"))
    with pytest.raises(ValueError, match="max_taps"):
        DirectConvConfig(max_taps=0)
    with pytest.raises(ValueError, match="fuse_pool must be True or False"):
        DirectConvConfig(fuse_pool="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "action"), [("vgg11-bn", "direct+pool"), ("resnet20", "direct")])
def test_zoo_models_lower_their_stem_exactly(name: str, action: str) -> None:
    x = torch.randn(8, 1, 28, 28)
    model = _with_bn_stats(create_model(name, num_classes=10, in_channels=1, input_size=28), x)
    with torch.no_grad():
        before = model(x)
    report = lower_direct_conv_(model)
    lowered = report.lowered
    assert [r.action for r in lowered] == [action]
    assert len(report.folded) == 1  # only the lowered conv's batch norm
    others = [r for r in report.rows if r.action == "skipped"]
    assert others and all("max_in_channels" in (r.reason or "") for r in others)
    if action == "direct":  # resnet20: the stem feeds a residual block, no pool
        assert "no MaxPool2d" in (lowered[0].reason or "")
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-4)
    assert model.slimtorch_arch["transforms"][-1]["name"] == "quant.direct_conv"


def test_lowered_model_round_trips_through_save_load(tmp_path: Path) -> None:
    x = torch.randn(4, 1, 28, 28)
    model = _with_bn_stats(create_model("vgg11-bn", num_classes=3, in_channels=1, input_size=28), x)
    lower_direct_conv_(model, DirectConvConfig(channels_last=True))
    save_model(model, tmp_path / "m", input_shape=(1, 28, 28), mean=[0.0], std=[1.0],
               class_names=["a", "b", "c"])  # fmt: skip
    loaded, _ = load_model(tmp_path / "m")
    assert isinstance(loaded.features[0], DirectConv2d) and loaded.features[0].pool == 2
    assert loaded.features[0].channels_last
    assert isinstance(loaded.features[3], nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_shared_relu_and_functional_relu_are_not_fused() -> None:
    class SharedRelu(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.relu = nn.ReLU()
            self.pool = nn.MaxPool2d(2)
            self.head = nn.Conv2d(4, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.relu(self.head(self.pool(self.relu(self.conv(x)))))

    net = SharedRelu().eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        before = net(x)
    row = lower_direct_conv_(net).rows[0]
    assert (row.conv, row.action) == ("conv", "direct") and "MaxPool2d" in (row.reason or "")
    assert isinstance(net.relu, nn.ReLU) and isinstance(net.pool, nn.MaxPool2d)
    with torch.no_grad():
        torch.testing.assert_close(net(x), before)


def test_padded_pool_is_not_fused_and_strict_raises_untouched() -> None:
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2, padding=1), nn.Conv2d(4, 8, 3)
    )
    row = lower_direct_conv_(net, DirectConvConfig(fold_bn=False)).rows[0]
    assert row.action == "direct" and "kernel == stride" in (row.reason or "")
    assert isinstance(net[2], nn.MaxPool2d)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 8, 3))
    with pytest.raises(TransformSkipError, match=r"1: 4 input channels > max_in_channels=3"):
        lower_direct_conv_(net, DirectConvConfig(max_in_channels=3), strict=True)
    with pytest.raises(TransformSkipError, match=r"1: 36 taps"):
        lower_direct_conv_(net, strict=True)
    assert isinstance(net[0], nn.Conv2d)  # nothing changed
    with pytest.raises(ValueError, match="match no module"):
        lower_direct_conv_(net, include=["stem"])
    report = lower_direct_conv_(net, include=["0"])
    assert [r.conv for r in report.rows] == ["0"] and isinstance(net[0], DirectConv2d)


def test_conv_called_twice_is_skipped() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.conv(x))

    row = lower_direct_conv_(Twice()).rows[0]
    assert row.action == "skipped" and "called 2 times" in (row.reason or "")


@pytest.mark.parametrize(
    ("device", "tol"),
    # TF32 convolutions downstream of the stem on a GPU: compare loosely there
    [("cpu", 1e-4), pytest.param("cuda", 1e-2, marks=pytest.mark.gpu)],
)
def test_compiled_lowered_model_matches_eager(device: str, tol: float) -> None:
    x = torch.randn(16, 1, 28, 28)
    model = _with_bn_stats(
        create_model("vgg11-bn", num_classes=10, in_channels=1, input_size=28), x
    ).to(device)
    x = x.to(device)
    with torch.no_grad():
        before = model(x)
    lower_direct_conv_(model)
    compiled = torch.compile(model, dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), before, rtol=tol, atol=tol)


def test_lowerings_of_an_int8_model_say_its_convolutions_are_int8() -> None:
    # direct-conv and conv-gemm on a quantized model exited with an empty table and no reason
    from slimtorch.models import create_model
    from slimtorch.quant import PTQConfig, lower_conv_gemm_, lower_direct_conv_, quantize_

    model, x = (
        create_model("lenet5", in_channels=1, input_size=28).eval(),
        torch.randn(8, 1, 28, 28),
    )
    quantize_(model, PTQConfig(mode="static"), calibration=x)
    for report in (lower_direct_conv_(model), lower_conv_gemm_(model)):
        assert [(r.conv, r.action) for r in report.rows] == [
            ("features.0", "skipped"), ("features.3", "skipped")]  # fmt: skip
        assert all("stored as int8 (QDQConv2d)" in str(r.reason) for r in report.rows)
