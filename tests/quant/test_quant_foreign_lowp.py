"""Low-precision casts and mixed precision on models outside the zoo: parameters the model uses
in its own forward, weights shared between layers, data-dependent branches, fp16 overflow,
layers the data never reaches, layers inside a module with parameters of its own, huge outputs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.models.transforms import ARCH_TRANSFORMS
from slimtorch.quant import CalibrationError
from slimtorch.quant._calib import rel_error
from slimtorch.quant.lowp import LowPrecisionConfig, PrecisionCheckError, cast_
from slimtorch.quant.mixed import MixedPrecisionConfig, mixed_precision_
from slimtorch.quant.mixed_sensitivity import measure_sensitivity
from slimtorch.quant.precision import layer_precisions


def _snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[tuple[str, str]]]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, [(n, type(m).__name__) for n, m in model.named_modules()]


def _unchanged(
    model: nn.Module, snap: tuple[dict[str, torch.Tensor], list[tuple[str, str]]]
) -> None:
    state, types = snap
    now = model.state_dict()
    assert [(n, type(m).__name__) for n, m in model.named_modules()] == types
    assert now.keys() == state.keys()
    assert all(now[k].dtype == v.dtype and torch.equal(now[k], v) for k, v in state.items())
    assert not layer_precisions(model)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


class _OwnParam(nn.Module):
    """Uses a parameter it owns itself with F.conv2d after a layer that gets cast."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.w = nn.Parameter(torch.randn(8, 8, 3, 3) * 0.1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.mid(x))
        x = torch.relu(F.conv2d(x, self.w, padding=1))
        return self.head(x.mean((2, 3)))


def _own_param() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = _OwnParam().eval()
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        return model, x, model(x)


@pytest.mark.parametrize("checked", [False, True])
def test_cast_of_a_model_using_its_own_parameter_runs(checked: bool) -> None:
    model, x, ref = _own_param()
    report = cast_(model, LowPrecisionConfig(dtype="fp16"), check_inputs=x if checked else None)
    assert {r.name: r.dtype for r in report.rows} == {
        "stem": "float32", "mid": "float16", "head": "float32"
    }  # fmt: skip
    assert model.mid.weight.dtype == torch.float16 and model.w.dtype == torch.float32
    with torch.no_grad():
        out = model(x)
    assert out.dtype == torch.float32
    assert _rel(out, ref) < 5e-3
    assert report.entry is not None and report.entry["params"]["output_fp32"] == ["mid"]
    assert any("w of its own" in note for note in report.notes)


def test_mixed_precision_of_a_model_using_its_own_parameter_runs() -> None:
    model, x, ref = _own_param()
    cfg = MixedPrecisionConfig(size_ratio=1.3, candidates=("fp16",), first_last=None)
    report = mixed_precision_(model, cfg, x)
    assert {r.choice for r in report.rows} == {"fp16"}
    with torch.no_grad():
        out = model(x)
    assert out.dtype == torch.float32
    assert report.output_error == pytest.approx(_rel(out, ref), rel=1e-3, abs=1e-7)
    assert _rel(out, ref) < 5e-3


class _Shared(nn.Module):
    """Reuses layer a's weight functionally, after layer b."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b(torch.relu(self.a(x))))
        h = torch.relu(F.linear(h, self.a.weight))
        return self.out(torch.relu(self.c(h)))


def test_a_cast_that_breaks_the_model_is_blamed_on_the_cast_and_can_fall_back() -> None:
    torch.manual_seed(0)
    model = _Shared().eval()
    x = torch.randn(16, 8)
    with torch.no_grad():
        ref = model(x)
    snap = _snapshot(model)
    with pytest.raises(PrecisionCheckError, match=r"cast breaks the model.*same dtype") as info:
        cast_(model, LowPrecisionConfig(keep_fp32=("b",)), check_inputs=x)
    assert "does not fit" not in str(info.value) and "unchanged" in str(info.value)
    _unchanged(model, snap)

    cfg = LowPrecisionConfig(keep_fp32=("b",), on_fail="fallback")
    report = cast_(model, cfg, check_inputs=x)
    rows = {r.name: r for r in report.rows}
    assert report.fallback == ["a"]
    assert rows["a"].dtype == "float32" and rows["a"].reason.startswith("fallback")
    assert "cast breaks the model" in rows["a"].reason
    assert rows["c"].dtype == "float16" and rows["out"].dtype == "float16"
    assert any("full cast failed" in note for note in report.notes)
    with torch.no_grad():
        out = model(x)
    assert out.dtype == torch.float32 and _rel(out, ref) < 5e-3


def test_mixed_precision_keeps_a_layer_whose_weight_the_forward_reads() -> None:
    # casting a alone broke the model (F.linear reads a.weight in float32), found only by the
    # final check; such a layer is now left out of the allocation, as PTQ leaves it
    torch.manual_seed(0)
    model = _Shared().eval()
    x = torch.randn(16, 8)
    with torch.no_grad():
        ref = model(x)
    snap = _snapshot(model)
    cfg = MixedPrecisionConfig(
        size_ratio=1.5, candidates=("fp16",), first_last=None, include=("a", "c", "out")
    )
    with pytest.raises(ValueError, match="no allocation meets the budget"):
        mixed_precision_(model, cfg, x)  # without a, 1.5x cannot be reached
    _unchanged(model, snap)
    cfg = MixedPrecisionConfig(
        size_ratio=1.2, candidates=("fp16",), first_last=None, include=("a", "c", "out")
    )
    report = mixed_precision_(model, cfg, x)
    assert [(r.name, r.choice) for r in report.rows] == [("c", "fp16"), ("out", "fp16")]
    with torch.no_grad():
        assert _rel(model(x), ref) < 5e-3


class _Branch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 10)
        self.fc2 = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x)).mean((2, 3))
        if x.sum() > 0:
            return self.fc1(y)
        return self.fc2(y)


def test_cast_returns_float32_on_branches_the_check_data_never_took() -> None:
    torch.manual_seed(0)
    model = _Branch().eval()
    pos, neg = torch.randn(8, 3, 8, 8).abs(), -torch.randn(8, 3, 8, 8).abs()
    with torch.no_grad():
        ref_pos, ref_neg = model(pos), model(neg)
    report = cast_(model, LowPrecisionConfig(dtype="fp16", keep_fp32=("last",)), check_inputs=pos)
    rows = {r.name: r for r in report.rows}
    assert rows["conv"].dtype == "float16"
    assert rows["fc1"].dtype == "float32" and "last" in rows["fc1"].reason
    assert rows["fc2"].dtype == "float32" and "never ran on the check data" in rows["fc2"].reason
    with torch.no_grad():
        out_pos, out_neg = model(pos), model(neg)
    assert out_pos.dtype == torch.float32 and out_neg.dtype == torch.float32
    assert _rel(out_pos, ref_pos) < 5e-3 and _rel(out_neg, ref_neg) < 5e-3


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.cls = nn.Linear(16, 3)
        self.reg = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.a(x))
        return {"cls": self.cls(h), "reg": self.reg(h)}


def test_every_output_of_a_cast_model_is_float32_and_the_cast_replays() -> None:
    torch.manual_seed(0)
    model = _TwoHeads().eval()
    fresh = copy.deepcopy(model)
    x = torch.randn(8, 8)
    with torch.no_grad():
        ref = model(x)
    report = cast_(model, LowPrecisionConfig(keep_fp32=()))  # the check takes one tensor output
    assert {r.dtype for r in report.rows} == {"float16"}
    assert report.entry is not None
    ARCH_TRANSFORMS.get("quant.lowp")(fresh, report.entry["params"])  # what load_model does
    with torch.no_grad():
        for net in (model, fresh):
            out = net(x)
            for key in ("cls", "reg"):
                assert out[key].dtype == torch.float32
                assert _rel(out[key], ref[key]) < 5e-3


class _Big(nn.Module):
    """Layer b's outputs (~3e5) lie beyond float16's range; the model scales them down."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 64)
        self.b = nn.Linear(64, 64)
        self.c = nn.Linear(64, 64)
        self.d = nn.Linear(64, 4)
        with torch.no_grad():
            self.b.weight.mul_(3e5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b(torch.relu(self.a(x)))) * 1e-6
        return self.d(torch.relu(self.c(h)))


def test_fp16_overflow_is_measured_and_avoided() -> None:
    torch.manual_seed(0)
    model = _Big().eval()
    x = torch.randn(16, 8)
    with torch.no_grad():
        ref = model(x)
    sens = measure_sensitivity(model, ["b", "c"], x, candidates=("fp16", "int8"))
    assert sens["b"]["fp16"] == math.inf and sens["b"]["int8"] < 1e-4
    assert sens["c"]["fp16"] < 1e-6
    report = mixed_precision_(model, MixedPrecisionConfig(size_ratio=2.0, first_last=None), x)
    rows = {r.name: r for r in report.rows}
    assert rows["b"].choice in ("int8", "int4") and "65504" in rows["b"].reason
    with torch.no_grad():
        out = model(x)
    assert torch.isfinite(out).all() and _rel(out, ref) < 0.02


def test_mixed_precision_refuses_layers_the_data_never_reaches() -> None:
    torch.manual_seed(0)
    model = _Branch().eval()
    snap = _snapshot(model)
    calib = torch.randn(8, 3, 8, 8).abs()  # always the fc1 branch
    with pytest.raises(CalibrationError, match="fc2 never ran on the calibration data"):
        mixed_precision_(model, MixedPrecisionConfig(size_ratio=2.0, fold_bn=False), calib)
    _unchanged(model, snap)
    both = [calib, -torch.randn(8, 3, 8, 8).abs()]  # data that takes both branches is fine
    report = mixed_precision_(model, MixedPrecisionConfig(size_ratio=2.0, fold_bn=False), both)
    assert [r.name for r in report.rows] == ["conv", "fc1", "fc2"]


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(32))  # layer scale: the block owns a parameter
        self.fc = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * torch.relu(self.fc(x))


class _Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.block = _Block()
        self.out = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.block(torch.relu(self.inp(x))))


@pytest.mark.parametrize("candidates", [("fp16", "int8", "int4"), ("fp16",)])
def test_fp16_is_offered_only_to_layers_that_are_cast_on_their_own(
    candidates: tuple[str, ...],
) -> None:
    torch.manual_seed(0)
    model = _Nested().eval()
    x = torch.randn(8, 16)
    with torch.no_grad():
        ref = model(x)
    ratio = 1.5 if len(candidates) > 1 else 1.2
    cfg = MixedPrecisionConfig(size_ratio=ratio, candidates=candidates)
    report = mixed_precision_(model, cfg, x)
    rows = {r.name: r for r in report.rows}
    assert rows["block.fc"].choice != "fp16"
    assert "fp16 not offered: block.fc sits in block" in rows["block.fc"].reason
    assert "block.fc" not in layer_precisions(model) and model.block.gamma.dtype == torch.float32
    if candidates == ("fp16",):
        assert rows["block.fc"].choice == "fp32" and rows["inp"].choice == "fp16"
    with torch.no_grad():
        out = model(x)
    assert out.dtype == torch.float32 and _rel(out, ref) < 0.02
    assert report.output_error == pytest.approx(_rel(out, ref), rel=1e-3, abs=1e-7)


def test_relative_error_of_huge_outputs_does_not_overflow() -> None:
    assert rel_error([torch.tensor([1.01e20])], [torch.tensor([1e20])]) == pytest.approx(
        0.01, rel=1e-5
    )
    assert rel_error([torch.tensor([2e30, 0.0])], [torch.tensor([1e30, 0.0])]) == 1.0
    assert rel_error([torch.tensor([math.inf])], [torch.tensor([1.0])]) == math.inf
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    with torch.no_grad():
        model[2].weight.mul_(1e20)
    ref_model = copy.deepcopy(model)
    x = torch.randn(16, 8)
    cfg = MixedPrecisionConfig(size_ratio=3.0, candidates=("int8", "int4"), first_last=None)
    report = mixed_precision_(model, cfg, x)
    with torch.no_grad():
        true = _rel(model(x), ref_model(x))
    assert true > 1e-3 and report.output_error == pytest.approx(true, rel=1e-4)
    assert all(0.0 < r.losses["int8"] < r.losses["int4"] < 1.0 for r in report.rows)


def test_a_layer_that_overflows_at_every_allowed_precision_is_named() -> None:
    torch.manual_seed(0)
    model = _Big().eval()
    snap = _snapshot(model)
    cfg = MixedPrecisionConfig(size_ratio=1.5, candidates=("fp16",), first_last=None)
    with pytest.raises(PrecisionCheckError, match=r"layer\(s\) b make the outputs NaN/Inf"):
        mixed_precision_(model, cfg, torch.randn(16, 8))
    _unchanged(model, snap)


class _Tokens(nn.Module):
    """Token ids in, an embedding, then the layers quantization works on."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc1, self.fc2 = nn.Embedding(100, 32), nn.Linear(32, 64), nn.Linear(64, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.emb(ids)).mean(1)))


def test_token_id_inputs_calibrate_static_ptq_casts_and_mixed_precision() -> None:
    # int64 token ids were refused as "uint8 pixels" by every calibrated path
    from slimtorch.quant import PTQConfig, quantize_

    torch.manual_seed(0)
    model, ids = _Tokens().eval(), torch.randint(0, 100, (16, 12))
    with torch.no_grad():
        ref = model(ids)
    for run in (
        lambda m: quantize_(m, PTQConfig(mode="static"), calibration=ids),
        lambda m: cast_(m, LowPrecisionConfig(dtype="fp16"), check_inputs=ids),
        lambda m: mixed_precision_(m, MixedPrecisionConfig(size_ratio=1.3), calibration=ids),
    ):
        work = copy.deepcopy(model)
        run(work)
        with torch.no_grad():
            out = work(ids)
        assert out.dtype == torch.float32 and rel_error([out], [ref]) < 0.05
    with pytest.raises(ValueError, match=r"torch.uint8; expected float inputs .* token ids"):
        cast_(copy.deepcopy(model), LowPrecisionConfig(dtype="fp16"), check_inputs=ids.byte())


def test_mixed_precision_budgets_a_pruned_model_without_its_masks() -> None:
    # the bool masks counted as weights: a size_ratio=4 budget on a pruned model was refused
    # with the masks as bytes "outside the allocated layers"
    from slimtorch.models import create_model
    from slimtorch.prune import MagnitudeConfig, prune_

    torch.manual_seed(0)
    model = create_model("lenet5", in_channels=1, input_size=28).eval()
    x = torch.randn(16, 1, 28, 28)
    plain = copy.deepcopy(model)
    prune_(model, MagnitudeConfig(sparsity=0.7))
    with torch.no_grad():
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if "_mask" not in k})
    cfg = MixedPrecisionConfig(size_ratio=4.0)
    pruned, dense = mixed_precision_(model, cfg, x), mixed_precision_(plain, cfg, x)
    assert pruned.size_fp32 == dense.size_fp32 and pruned.size_after == dense.size_after


def test_mixed_precision_of_an_int8_model_says_it_is_int8() -> None:
    # it said "no Conv2d/Linear layer matches include=None, exclude=()"
    from slimtorch.models import create_model
    from slimtorch.quant import PTQConfig, quantize_

    model, x = (
        create_model("lenet5", in_channels=1, input_size=28).eval(),
        torch.randn(8, 1, 28, 28),
    )
    quantize_(model, PTQConfig(mode="static"), calibration=x)
    with pytest.raises(ValueError, match=r"5 layer\(s\) of LeNet5 .* hold int8 weights already"):
        mixed_precision_(model, MixedPrecisionConfig(size_ratio=2.0), x)


def test_mixed_precision_leaves_the_factors_a_fused_kernel_reads() -> None:
    # the fused Tucker kernel reads its factor convolutions' weights itself: they never ran as
    # modules, and mixed precision refused the whole model as "never ran on the calibration data"
    from slimtorch.decompose import TuckerConfig, decompose_, fuse_tucker_
    from slimtorch.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet20", in_channels=1, input_size=16).eval()
    decompose_(model, TuckerConfig(rank=0.5))
    assert fuse_tucker_(model).lowered
    x = torch.randn(16, 1, 16, 16)
    with torch.no_grad():
        ref = model(x)
    report = mixed_precision_(model, MixedPrecisionConfig(size_ratio=1.02), x)
    assert all(".first" not in r.name and ".core" not in r.name for r in report.rows)
    with torch.no_grad():
        assert rel_error([model(x)], [ref]) < 0.05
