"""Batch-norm folding: exact in eval mode, recorded for save/load, skips with reasons."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from slimtorch.core.errors import TransformSkipError
from slimtorch.models import create_model, load_model, save_model
from slimtorch.quant.fold import find_conv_bn_pairs, fold_bn_, fold_conv_bn


def _with_bn_stats(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 1.0
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def test_fold_conv_bn_matches_reference_formula() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, 3, 3, generator=g)
    b = torch.randn(4, generator=g)
    mean, var = torch.randn(4, generator=g), torch.rand(4, generator=g) + 0.1
    gamma, beta = torch.randn(4, generator=g), torch.randn(4, generator=g)
    wf, bf = fold_conv_bn(w, b, mean, var, gamma, beta, 1e-5)
    conv = nn.Conv2d(3, 4, 3)
    bn = nn.BatchNorm2d(4, eps=1e-5).eval()
    with torch.no_grad():
        conv.weight.copy_(w)
        conv.bias.copy_(b)
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        bn.weight.copy_(gamma)
        bn.bias.copy_(beta)
    x = torch.randn(2, 3, 8, 8, generator=g)
    torch.testing.assert_close(nn.functional.conv2d(x, wf, bf), bn(conv(x)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="running_mean"):
        fold_conv_bn(w, b, mean[:3], var, gamma, beta, 1e-5)


@pytest.mark.parametrize(("name", "pairs"), [("resnet20", 21), ("vgg11-bn", 8)])
def test_fold_bn_is_exact_on_zoo_models(name: str, pairs: int) -> None:
    x = torch.randn(8, 1, 16, 16)
    model = _with_bn_stats(create_model(name, num_classes=10, in_channels=1, input_size=16), x)
    with torch.no_grad():
        before = model(x)
    report = fold_bn_(model)
    assert len(report.folded) == pairs == len(report.rows)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert model.slimtorch_arch["transforms"][-1]["name"] == "quant.fold_bn"


def test_folded_model_round_trips_through_save_load(tmp_path: Path) -> None:
    x = torch.randn(4, 1, 8, 8)
    model = _with_bn_stats(create_model("resnet20", num_classes=3, in_channels=1, input_size=8), x)
    fold_bn_(model, include=["layer1.*"])
    assert isinstance(model.bn1, nn.BatchNorm2d)  # not included: kept
    assert isinstance(model.layer1[0].bn1, nn.Identity)
    save_model(model, tmp_path / "m", input_shape=(1, 8, 8), mean=[0.0], std=[1.0],
               class_names=["a", "b", "c"])  # fmt: skip
    loaded, _ = load_model(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_pairs_skip_with_reasons_and_strict_raises() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    report = fold_bn_(net)
    assert report.rows[0].action == "skipped"
    assert "running statistics" in (report.rows[0].reason or "")
    assert isinstance(net[1], nn.BatchNorm2d)  # untouched
    with pytest.raises(TransformSkipError, match="running statistics"):
        fold_bn_(net, strict=True)


def test_conv_output_read_twice_is_not_a_pair() -> None:
    class TwoReaders(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.bn = nn.BatchNorm2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + y

    assert find_conv_bn_pairs(TwoReaders()) == []


def test_untraceable_model_is_reported_not_folded() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.bn = nn.BatchNorm2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent: fx cannot trace it
                x = -x
            return self.bn(self.conv(x))

    net = Branchy()
    report = fold_bn_(net)
    assert report.rows == [] and "torch.fx" in (report.reason or "")
    with pytest.raises(TransformSkipError, match=r"torch\.fx"):
        fold_bn_(net, strict=True)


class _ConvUsedTwice(nn.Module):
    """The conv runs twice: once into the batch norm, once straight into the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.conv(x)


class _BnUsedTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.bn = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.c1(x)) + self.bn(self.c2(x))


@pytest.mark.parametrize("cls", [_ConvUsedTwice, _BnUsedTwice])
def test_modules_used_twice_are_not_folded(cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = cls().eval()
    bn = model.get_submodule("bn")
    assert isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None
    bn.running_mean.uniform_(-1, 1)
    x = torch.randn(2, 3, 8, 8)
    before = model(x)
    report = fold_bn_(model)
    assert not report.folded and report.rows
    assert all("used more than once" in (r.reason or "") or "more than one pair" in (r.reason or "")
               for r in report.rows)  # fmt: skip
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


class _TiedConvs(nn.Module):
    """Two convolutions sharing one weight, each with its own batch norm."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.c2.weight = self.c1.weight
        self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.c2(torch.relu(self.bn1(self.c1(x)))))


def test_tied_conv_weights_are_not_folded() -> None:
    # folding both pairs scaled the one shared weight by both batch norms
    torch.manual_seed(0)
    x = torch.randn(4, 4, 8, 8)
    model = _with_bn_stats(_TiedConvs(), x)
    before = model(x)
    report = fold_bn_(model)
    assert not report.folded and len(report.rows) == 2
    assert all("tied weights" in (r.reason or "") for r in report.rows)
    assert model.c1.weight is model.c2.weight
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_fold_bn_refuses_globs_that_select_nothing_or_are_not_lists() -> None:
    model = nn.Sequential(
        *[nn.Conv2d(2, 2, 1) if i % 2 == 0 else nn.BatchNorm2d(2) for i in range(12)]
    )
    with pytest.raises(TypeError, match="include must be a list of glob strings"):
        fold_bn_(model, include="10")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'nope' match no module"):
        fold_bn_(model, exclude=["nope"])
    assert [r.conv for r in fold_bn_(model, include=["10"]).folded] == ["10"]


def test_transforms_that_read_the_traced_graph_leave_no_generated_source_behind() -> None:
    # each call built a GraphModule only to read its graph; torch keeps every GraphModule's
    # generated source for the life of the process (~20 KB a call)
    import linecache

    from slimtorch.models import create_model
    from slimtorch.quant import PTQConfig, quantize_
    from slimtorch.quant.direct import lower_direct_conv_

    def generated() -> int:
        return sum(k.startswith("<eval_with_key>") for k in linecache.cache)

    x = torch.randn(2, 1, 28, 28)
    before = generated()
    for _ in range(2):
        fold_bn_(create_model("resnet20").eval())
        quantize_(create_model("lenet5").eval(), PTQConfig(mode="static"), x)
        lower_direct_conv_(create_model("lenet5").eval())
    assert generated() == before
