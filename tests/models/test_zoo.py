"""Tests for the model zoo: shapes on MNIST/digits/CIFAR inputs, parameter counts, depth."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimtorch.models import create_model, list_models

ZOO = ["lenet5", "mlp", "mobilenetv2", "resnet20", "resnet32", "resnet56", "vgg11-bn"]


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32), (1, 8)])
def test_every_model_gives_finite_logits(name: str, channels: int, size: int) -> None:
    model = create_model(name, num_classes=7, in_channels=channels, input_size=size).eval()
    with torch.no_grad():
        out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_registered_models_are_the_zoo() -> None:
    assert set(ZOO) <= set(list_models())


@pytest.mark.parametrize("name", ZOO)
def test_last_layer_is_a_linear_named_fc_or_classifier(name: str) -> None:
    model = create_model(name, num_classes=5, in_channels=3, input_size=32)
    last_name, last = [(n, m) for n, m in model.named_modules() if len(list(m.children())) == 0][-1]
    assert last_name in ("fc", "classifier")
    assert isinstance(last, nn.Linear) and last.out_features == 5


def test_mlp_parameter_count() -> None:
    # 784*256+256 = 200960; 256*128+128 = 32896; 128*10+10 = 1290 -> 235146
    assert _count(create_model("mlp", in_channels=1, input_size=28)) == 235146
    # 8x8 digits, hidden (32,): 64*32+32 = 2080; 32*10+10 = 330 -> 2410
    assert _count(create_model("mlp", input_size=8, hidden=[32])) == 2410


def test_lenet5_parameter_count() -> None:
    # conv1 6*1*5*5+6 = 156; conv2 16*6*5*5+16 = 2416; 28 -> 28 -> 14 -> 10 -> 5, so
    # fc1 16*5*5*120+120 = 48120; fc2 120*84+84 = 10164; classifier 84*10+10 = 850 -> 61706
    assert _count(create_model("lenet5", in_channels=1, input_size=28)) == 61706
    # 8x8: 8 -> 8 -> 4 -> 4 (conv2 padded) -> 2, fc1 16*2*2*120+120 = 7800 -> 21386
    assert _count(create_model("lenet5", in_channels=1, input_size=8)) == 21386
    # 3x32x32: conv1 6*3*25+6 = 456; 32 -> 16 -> 12 -> 6, fc1 576*120+120 = 69240 -> 83126
    assert _count(create_model("lenet5", in_channels=3, input_size=32)) == 83126


def test_resnet20_parameter_count_cifar10() -> None:
    # stem conv 3*16*9 = 432 + bn 32                                         =    464
    # layer1: 3 blocks x (2 convs 16*16*9 = 2304 each + 2 bn 32)             = 14_016
    # layer2: block0 conv 16*32*9 = 4608 + conv 32*32*9 = 9216 + 2 bn 64
    #         + projection 16*32 = 512 + bn 64 = 14528; 2 blocks x 18560    = 51_648
    # layer3: block0 32*64*9 = 18432 + 64*64*9 = 36864 + 2 bn 128 + 32*64 = 2048
    #         + bn 128 = 57728; 2 blocks x (2*36864 + 2*128) = 147968      = 205_696
    # fc 64*10+10                                                          =    650
    assert _count(create_model("resnet20", in_channels=3, input_size=32)) == 272474


def _depth(model: nn.Module) -> int:
    return sum(
        1
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d | nn.Linear) and "shortcut" not in name
    )


@pytest.mark.parametrize(("name", "n"), [("resnet20", 3), ("resnet32", 5), ("resnet56", 9)])
def test_resnet_depth_is_6n_plus_2(name: str, n: int) -> None:
    model = create_model(name, in_channels=3, input_size=32)
    assert _depth(model) == 6 * n + 2
    projections = [
        k for k, m in model.named_modules() if "shortcut" in k and isinstance(m, nn.Conv2d)
    ]
    assert projections == ["layer2.0.shortcut.0", "layer3.0.shortcut.0"]


def test_resnet_kaiming_init_scale() -> None:
    model = create_model("resnet56", in_channels=3, input_size=32)
    w = model.layer3[1].conv1.weight  # fan_out = 64 * 3 * 3 -> std = sqrt(2 / 576)
    assert w.std().item() == pytest.approx((2 / 576) ** 0.5, rel=0.05)


def _modules(name: str, size: int) -> list[nn.Module]:
    return list(create_model(name, input_size=size).modules())


def test_vgg_skips_pools_that_would_empty_the_map() -> None:
    pools = {
        s: sum(isinstance(m, nn.MaxPool2d) for m in _modules("vgg11-bn", s)) for s in (32, 28, 8)
    }
    # 32 -> 16 8 4 2 1 (5 pools); 28 -> 14 7 3 1 (4); 8 -> 4 2 1 (3)
    assert pools == {32: 5, 28: 4, 8: 3}
    convs = [m for m in create_model("vgg11-bn").modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 256, 512, 512, 512, 512]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in create_model("vgg11-bn").modules()) == 8


def test_mobilenetv2_small_input_strides_and_width() -> None:
    model = create_model("mobilenetv2", in_channels=3, input_size=32).eval()
    with torch.no_grad():
        fmap = model.features(torch.randn(1, 3, 32, 32))
    assert fmap.shape == (1, 1280, 4, 4)  # 8x downsampling: stem and 24-channel stage stride 1
    slim = create_model("mobilenetv2", in_channels=3, input_size=32, width_mult=0.5)
    assert slim.features[0][0].out_channels == 16  # 32 * 0.5
    assert slim.classifier.in_features == 1280
    assert _count(slim) < _count(model)
    residual = [m.use_residual for m in model.features if hasattr(m, "use_residual")]
    # 17 blocks; residual in the repeats of each stage: 0 + 1 + 2 + 3 + 2 + 2 + 0 = 10
    assert len(residual) == 17 and sum(residual) == 10
