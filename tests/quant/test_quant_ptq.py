"""quantize_: modes, bad input (model untouched), residual handling, real Fashion-MNIST data."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from model_helpers import same_model
from slimtorch.core.errors import TransformSkipError
from slimtorch.models import create_model
from slimtorch.quant import QDQConv2d, QDQLinear
from slimtorch.quant.convert import QDQAct
from slimtorch.quant.observers import CalibrationError
from slimtorch.quant.ptq import PTQConfig, quantize_, residual_points


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()  # fmt: skip


def _batches(n: int = 4, shape: tuple[int, ...] = (16, 1, 12, 12)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


@pytest.mark.parametrize("mode", ["weight_only", "dynamic", "static"])
@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse"])
def test_modes_quantize_every_layer(mode: str, observer: str) -> None:
    if mode != "static" and observer != "minmax":
        pytest.skip("the observer only matters for static activations")
    model, ref = _cnn(), _cnn()
    x = _batches(1)[0]
    cfg = PTQConfig(mode=mode, observer=observer)
    report = quantize_(model, cfg, calibration=_batches() if mode == "static" else None)
    assert [r.name for r in report.rows] == ["0", "4", "8"]
    assert all(r.action == "quantized" and r.mode == mode for r in report.rows)
    assert isinstance(model[0], QDQConv2d) and isinstance(model[8], QDQLinear)
    assert (model[0].input_scale is not None) == (mode == "static")
    if mode != "weight_only":
        assert isinstance(model[1], nn.Identity)  # BatchNorm folded
        assert report.info["folded_bn"] == [["0", "1"]]
    with torch.no_grad():
        err = float((model(x) - ref(x)).abs().max() / ref(x).abs().max())
    assert err < 0.08
    totals = report.to_dict()["totals"]
    assert totals["bytes_before"] > 3 * totals["bytes_after"] or mode == "weight_only"


def test_skip_first_last_include_exclude_and_strict() -> None:
    model = _cnn()
    report = quantize_(model, PTQConfig(mode="weight_only", skip_first=True, skip_last=True))
    assert [(r.name, r.action) for r in report.rows] == [
        ("0", "skipped"), ("4", "quantized"), ("8", "skipped")]  # fmt: skip
    assert "skip_first" in (report.rows[0].reason or "")
    model = _cnn()
    report = quantize_(model, PTQConfig(mode="weight_only"), include=["[04]"], exclude=["0"])
    assert [r.name for r in report.rows] == ["4"]
    model, before = _cnn(), _cnn()
    with pytest.raises(TransformSkipError, match="0: first layer"):
        quantize_(model, PTQConfig(mode="weight_only", skip_first=True), strict=True)
    assert same_model(model, before)
    with pytest.raises(ValueError, match="match no module"):
        quantize_(model, PTQConfig(mode="weight_only"), include=["nope*"])


class _HeadFirst(nn.Module):
    """The classifier is registered before the body it follows."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 4)
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)).mean((2, 3)))


def test_static_skip_first_last_follow_the_order_the_data_runs() -> None:
    # static mode took first/last in registration order: the head was "first", the stem "last"
    torch.manual_seed(0)
    x = torch.randn(8, 1, 10, 10)
    report = quantize_(_HeadFirst(), PTQConfig(skip_first=True, skip_last=True), calibration=x)
    assert {r.name: r.action for r in report.rows} == {
        "body.0": "skipped", "body.2": "quantized", "head": "skipped"}  # fmt: skip
    assert "skip_first" in next(r.reason for r in report.rows if r.name == "body.0")
    report = quantize_(_HeadFirst(), PTQConfig(mode="weight_only", skip_first=True))
    assert {r.name for r in report.rows if r.action == "skipped"} == {"head"}  # module order


class _Log(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)  # NaN for negative inputs


def test_bad_calibration_leaves_model_untouched() -> None:
    model, before = _cnn(), _cnn()
    with pytest.raises(ValueError, match="needs calibration data"):
        quantize_(model, PTQConfig(mode="static"))
    with pytest.raises(ValueError, match="empty"):
        quantize_(model, PTQConfig(mode="static"), calibration=[])
    with pytest.raises(ValueError, match=r"expected \(N, 1, H, W\)"):
        quantize_(model, PTQConfig(mode="static"), calibration=_batches(2, (4, 3, 12, 12)))
    assert same_model(model, before)
    resnet = create_model("resnet20", in_channels=1, input_size=28).eval()
    with pytest.raises(ValueError, match=r"expected \(N, 1, 28, 28\)"):
        quantize_(resnet, PTQConfig(mode="static"), calibration=_batches(1, (2, 3, 28, 28)))
    nan_model = nn.Sequential(nn.Linear(4, 4), _Log(), nn.Linear(4, 2)).eval()
    nan_before = copy.deepcopy(nan_model)
    with pytest.raises(CalibrationError, match=r"input of '2'.*NaN/Inf"):
        quantize_(nan_model, PTQConfig(mode="static"), calibration=[torch.randn(8, 4)])
    assert same_model(nan_model, nan_before)


def test_calibration_range_beyond_float32_leaves_batch_norms_in_place() -> None:
    # finite inputs whose max - min overflows float32 gave an infinite input scale; the error
    # came after the real model's batch norms had been folded
    model = _cnn()
    with torch.no_grad():
        model[0].weight.mul_(1e-30)  # every activation stays finite
    before = copy.deepcopy(model)
    wide = [(torch.rand(8, 1, 12, 12) * 2 - 1) * 3e38]
    with pytest.raises(CalibrationError, match=r"'0'.*no usable int8 range.*unchanged"):
        quantize_(model, PTQConfig(mode="static"), calibration=wide)
    assert isinstance(model[1], nn.BatchNorm2d)
    assert same_model(model, before)


def test_residual_points_and_resnet_static() -> None:
    model = create_model("resnet20", in_channels=1, input_size=28).eval()
    ref = copy.deepcopy(model)
    x = torch.randn(8, 1, 28, 28)
    report = quantize_(model, PTQConfig(mode="static"), calibration=[x])
    acts = report.info["activations"]
    assert "relu" in acts and all(
        f"layer{s}.{b}.relu2" in acts for s in (1, 2, 3) for b in (0, 1, 2)
    )
    assert isinstance(model.layer1[0].relu2, QDQAct)
    assert model.layer1[0].conv2.output_scale is not None  # feeds the residual add
    assert model.layer1[0].conv1.output_scale is None
    assert model.layer2[0].shortcut[0].output_scale is not None
    assert len(report.info["folded_bn"]) == 21
    with torch.no_grad():
        agree = (model(x).argmax(1) == ref(x).argmax(1)).float().mean()
    assert agree >= 0.75
    outs, acts2, note = residual_points(nn.Sequential(nn.Linear(2, 2)), ["0"])
    assert outs == set() and acts2 == set() and note == ""


def test_static_ptq_on_fashion_mnist(shared_data) -> None:
    from slimtorch.data import load_dataset

    torch.manual_seed(0)
    train = load_dataset("fashion-mnist", "train", root=shared_data / "fashion-mnist",
                         download=False)  # fmt: skip
    test = load_dataset("fashion-mnist", "test", root=shared_data / "fashion-mnist",
                        download=False)  # fmt: skip

    def prep(images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255 - 0.286) / 0.353

    xs, ys = prep(train.images[:4000]), train.labels[:4000]
    model = create_model("mlp", num_classes=10, in_channels=1, input_size=28)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    torch.set_num_threads(2)
    for _ in range(2):
        for i in range(0, len(xs), 100):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xs[i : i + 100]), ys[i : i + 100]).backward()
            opt.step()
    model.eval()
    xt, yt = prep(test.images[:2000]), test.labels[:2000]
    with torch.no_grad():
        acc_fp32 = float((model(xt).argmax(1) == yt).float().mean())
    calib = [(xs[i : i + 64], ys[i : i + 64]) for i in range(0, 512, 64)]
    report = quantize_(model, PTQConfig(mode="static", observer="percentile"), calibration=calib)
    with torch.no_grad():
        acc_int8 = float((model(xt).argmax(1) == yt).float().mean())
    assert acc_fp32 > 0.75
    assert acc_int8 >= acc_fp32 - 0.01
    assert report.to_dict()["totals"]["ratio"] > 3.5


def test_layers_outside_the_selection_keep_float_outputs() -> None:

    torch.manual_seed(0)
    model = create_model("resnet20", in_channels=1, input_size=28, num_classes=10).eval()
    calib = [torch.randn(16, 1, 28, 28) for _ in range(2)]
    only_fc = copy.deepcopy(model)
    report = quantize_(only_fc, PTQConfig(mode="static"), calib, include=["fc"])
    assert [r.name for r in report.quantized] == ["fc"]
    assert not [n for n, m in only_fc.named_modules() if isinstance(m, QDQAct)]
    assert "layer1.0.conv2.weight" in only_fc.state_dict()  # not wrapped, not renamed
    no_layer1 = copy.deepcopy(model)
    quantize_(no_layer1, PTQConfig(mode="static"), calib, exclude=["layer1.*"])
    wrapped = [n for n, m in no_layer1.named_modules() if isinstance(m, QDQAct)]
    assert wrapped and not [n for n in wrapped if n.startswith("layer1.")]


def test_unfolded_batch_norms_and_an_explicit_layer_list_keep_the_residual_qdq() -> None:
    torch.manual_seed(0)
    model = create_model("resnet20", in_channels=1, input_size=28, num_classes=10).eval()
    calib = [torch.randn(16, 1, 28, 28) for _ in range(2)]

    def wrapped(**kw: object) -> int:
        work = copy.deepcopy(model)
        quantize_(work, PTQConfig(mode="static", **kw.pop("cfg", {})), calib, **kw)
        return len([n for n, m in work.named_modules() if isinstance(m, QDQAct)])

    default = wrapped()
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert default > 0 and wrapped(include=layers) == default  # include picks layers only
    assert wrapped(cfg={"fold_bn": False}) > 0  # a batch norm before the add is no layer


def test_layer_names_with_glob_characters_fold_and_quantize() -> None:
    # the batch-norm fold took the exact names of conv + BN pairs as globs: a ModuleDict key
    # 'stage[1]' matched no module and static PTQ failed
    from slimtorch.quant.direct import DirectConvConfig, lower_direct_conv_

    class Keyed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            conv_bn = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
            self.blk = nn.ModuleDict({"stage[1]": nn.Sequential(*conv_bn)})
            self.fc = nn.Linear(8, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.blk["stage[1]"](x).mean((2, 3)))

    torch.manual_seed(0)
    for lower in (False, True):
        model = Keyed().eval()
        if lower:
            assert lower_direct_conv_(model, DirectConvConfig()).rows[0].action == "direct"
            continue
        report = quantize_(model, PTQConfig(mode="static"), calibration=[torch.randn(8, 3, 8, 8)])
        assert report.info["folded_bn"] == [["blk.stage[1].0", "blk.stage[1].1"]]


def test_pruning_masks_are_not_counted_as_weight_bytes_saved() -> None:
    # a pruned lenet5 read 308294 -> 63358 bytes (4.87x) against the dense one's 246824 (3.90x)
    # for the same weights: the bool masks, which the int8 layers drop, counted as weights
    from slimtorch.prune import MagnitudeConfig, prune_
    from slimtorch.quant import PTQConfig, quantize_

    totals = []
    for pruned in (False, True):
        torch.manual_seed(0)
        model = create_model("lenet5", in_channels=1, input_size=28).eval()
        if pruned:
            prune_(model, MagnitudeConfig(sparsity=0.5))
        totals.append(quantize_(model, PTQConfig(mode="weight_only")).to_dict()["totals"])
    assert totals[0]["bytes_before"] == totals[1]["bytes_before"] == 246824


def test_a_layer_with_its_own_weight_tensors_gets_a_kept_in_float_row() -> None:
    # a Tensor-Train layer (weights in a ParameterList) was passed over without a row, so
    # strict=True passed while the layer stayed float
    from slimtorch.decompose import TTConfig, decompose_
    from slimtorch.quant import PTQConfig, quantize_

    torch.manual_seed(0)
    model = create_model("lenet5", in_channels=1, input_size=28).eval()
    decompose_(model, TTConfig(rank=0.5), include=["fc1"])
    kind = type(model.fc1).__name__
    with pytest.raises(TransformSkipError, match=rf"fc1: no int8 form of {kind}"):
        quantize_(model, PTQConfig(mode="weight_only"), strict=True)
    rows = quantize_(model, PTQConfig(mode="weight_only")).rows
    assert [r.name for r in rows if r.action == "skipped"] == ["fc1"]


def test_a_channels_last_model_stays_channels_last_through_quantize_and_a_reload(
    tmp_path,
) -> None:
    # its int8 weights came out NCHW and, being buffers, were not looked at by save_model,
    # which recorded no layout: the reloaded model ran NCHW
    import json

    from slimtorch.models import load_model, save_model
    from slimtorch.quant import PTQConfig, quantize_

    cl = torch.channels_last
    torch.manual_seed(0)
    model = create_model("resnet20", in_channels=1, input_size=28).eval().to(memory_format=cl)
    quantize_(model, PTQConfig(), calibration=[torch.randn(8, 1, 28, 28)])
    assert model.layer1[0].conv1.weight_int8.is_contiguous(memory_format=cl)
    save_model(model, tmp_path / "m", input_shape=(1, 28, 28), mean=[0.5], std=[0.5],
               class_names=list("0123456789"))  # fmt: skip
    assert json.loads((tmp_path / "m" / "config.json").read_text())["memory_format"] == (
        "channels_last"
    )
    loaded, _ = load_model(tmp_path / "m")
    assert loaded.layer1[0].conv1.weight_int8.is_contiguous(memory_format=cl)


def test_a_pruned_channels_last_model_keeps_its_layout_record(tmp_path) -> None:
    # its NCHW bool masks, now read with the buffers, made the layout check fail
    import json

    from slimtorch.models import save_model
    from slimtorch.prune import MagnitudeConfig, prune_

    torch.manual_seed(0)
    model = create_model("resnet20", in_channels=1, input_size=28).to(
        memory_format=torch.channels_last
    )
    prune_(model, MagnitudeConfig(sparsity=0.5))
    save_model(model, tmp_path / "m", input_shape=(1, 28, 28), mean=[0.5], std=[0.5],
               class_names=list("0123456789"))  # fmt: skip
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["memory_format"] == "channels_last"


def test_a_container_holding_a_parameter_and_layers_gets_no_row() -> None:
    # a block with a position table beside its Linear layers was reported skipped (its bytes
    # counted twice) and failed strict mode, though its layers were quantized
    from slimtorch.quant import PTQConfig, quantize_

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos = nn.Parameter(torch.zeros(1, 4, 32))
            self.fc1, self.fc2 = nn.Linear(32, 32), nn.Linear(32, 32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.fc1(x + self.pos)))

    model = nn.Sequential(Block()).eval()
    rows = quantize_(model, PTQConfig(mode="weight_only"), strict=True).rows
    assert [(r.name, r.action) for r in rows] == [("0.fc1", "quantized"), ("0.fc2", "quantized")]
