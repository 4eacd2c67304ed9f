"""FP16/BF16 casts: keep-in-fp32 rules, boundary casts, checks, fallback, profiles, save/load."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from slimtorch.core.profiles import DeviceProfile
from slimtorch.models import create_model, load_model, save_model
from slimtorch.quant.lowp import (
    LowPrecisionConfig,
    PrecisionCheckError,
    cast_,
    precision_gain,
)
from slimtorch.quant.precision import layer_precisions, precision_units, set_precision_


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_channels=1, input_size=8)
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 1, 8, 8))
    return model.eval()


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa
    )


def test_config_validates() -> None:
    with pytest.raises(ValueError, match="dtype"):
        LowPrecisionConfig(dtype="fp8")
    with pytest.raises(ValueError, match="keep_fp32"):
        LowPrecisionConfig(keep_fp32="first")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_output_error"):
        LowPrecisionConfig(max_output_error=0.0)
    cfg = LowPrecisionConfig(dtype="bf16", keep_fp32=["norm"])  # type: ignore[arg-type]
    assert cfg.keep_fp32 == ("norm",)
    assert LowPrecisionConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("dtype", "torch_dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)]
)
def test_cast_keeps_rules_in_fp32_and_runs_with_fp32_inputs(
    dtype: str, torch_dtype: torch.dtype
) -> None:
    model = _resnet()
    x = torch.randn(16, 1, 8, 8)
    labels = torch.randint(0, 10, (16,))
    with torch.no_grad():
        ref = model(x)
    report = cast_(
        model,
        LowPrecisionConfig(dtype=dtype, max_output_error=0.05, max_accuracy_drop=1.0),
        check_inputs=(x, labels),
    )
    rows = {r.name: r for r in report.rows}
    assert rows["conv1"].dtype == "float32" and "first" in rows["conv1"].reason
    assert rows["fc"].dtype == "float32" and "last" in rows["fc"].reason
    assert rows["bn1"].dtype == "float32" and "norm" in rows["bn1"].reason
    assert rows["layer2.0.conv1"].dtype == str(torch_dtype).removeprefix("torch.")
    assert model.layer2[0].conv1.weight.dtype == torch_dtype
    assert model.conv1.weight.dtype == torch.float32
    assert set(rows) == set(precision_units(model))
    with torch.no_grad():
        out = model(x)
    assert out.dtype == torch.float32
    err = float((out - ref).norm() / ref.norm())
    assert report.checked and report.output_error == pytest.approx(err, rel=1e-3, abs=1e-6)
    assert 0 < err < 0.05
    assert report.accuracy_before is not None and report.accuracy_after is not None
    assert report.size_after < report.size_before


def test_last_layer_cast_gets_fp32_output() -> None:
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    report = cast_(net, LowPrecisionConfig(keep_fp32=()), check_inputs=torch.randn(8, 8))
    assert all(r.dtype == "float16" for r in report.rows)
    assert net(torch.randn(2, 8)).dtype == torch.float32


def test_failed_check_refuses_and_leaves_model_untouched() -> None:
    model = _resnet()
    before = copy.deepcopy(model)
    strict = LowPrecisionConfig(dtype="bf16", max_output_error=1e-7)
    with pytest.raises(PrecisionCheckError, match="unchanged"):
        cast_(model, strict, check_inputs=torch.randn(8, 1, 8, 8))
    assert _same_state(model, before) and not layer_precisions(model)


def test_fallback_keeps_sensitive_layers_in_fp32_with_reasons() -> None:
    model = _resnet()
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        ref = model(x)
    cfg = LowPrecisionConfig(dtype="bf16", max_output_error=2e-3, on_fail="fallback")
    report = cast_(model, cfg, check_inputs=x)
    assert report.fallback
    rows = {r.name: r for r in report.rows}
    for name in report.fallback:
        assert rows[name].dtype == "float32" and rows[name].reason.startswith("fallback")
    with torch.no_grad():
        err = float((model(x) - ref).norm() / ref.norm())
    assert err <= 2e-3


def test_profile_decides_speed_or_memory() -> None:
    assert precision_gain("rx580", "fp16")[0] == "memory"
    assert precision_gain("h100-sxm", "fp16")[0] == "speed"
    assert precision_gain("gtx1060-6gb", "fp16")[0] == "memory"
    rates = dict(fp32=4e12, fp16=4e12 / 64, bf16=4e12, int8=4e12)
    slow = DeviceProfile(name="slow-fp16", description="native fp16 at 1/64 rate",
                         memory_bytes=2**30, memory_bandwidth=1e11, peak_flops=rates)  # fmt: skip
    assert precision_gain(slow, "fp16")[0] == "slower"
    assert "0.0156x the fp32 rate on slow-fp16" in precision_gain(slow, "fp16")[1]
    model = _resnet()
    report = cast_(model, LowPrecisionConfig(keep_fp32=()), check_inputs=torch.randn(4, 1, 8, 8),
                   device_profile="rx580")  # fmt: skip
    assert report.profile == "rx580" and report.gain == "memory"
    assert report.est_latency_before_s and report.est_latency_after_s
    assert "fp32 rate" in (report.gain_reason or "")


def test_bad_check_inputs_raise_before_any_change() -> None:
    model = _resnet()
    before = copy.deepcopy(model)
    cfg = LowPrecisionConfig()
    with pytest.raises(ValueError, match="does not fit"):
        cast_(model, cfg, check_inputs=torch.randn(4, 3, 8, 8))
    with pytest.raises(ValueError, match="empty"):
        cast_(model, cfg, check_inputs=[])
    with pytest.raises(ValueError, match="NaN"):
        cast_(model, cfg, check_inputs=torch.full((2, 1, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="matches no layer"):
        cast_(
            model, LowPrecisionConfig(keep_fp32=("nope.*",)), check_inputs=torch.randn(2, 1, 8, 8)
        )
    assert _same_state(model, before)
    cast_(model, cfg, check_inputs=torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="already cast"):
        cast_(model, cfg)


def test_cast_model_round_trips_through_save_load(tmp_path: Path) -> None:
    model = _resnet()
    x = torch.randn(4, 1, 8, 8)
    cast_(model, LowPrecisionConfig(), check_inputs=x)
    save_model(model, tmp_path / "m", input_shape=(1, 8, 8), mean=[0.0], std=[1.0],
               class_names=[str(i) for i in range(10)])  # fmt: skip
    loaded, card = load_model(tmp_path / "m")
    assert card.dtype == "mixed"
    assert layer_precisions(loaded) == layer_precisions(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_set_precision_rejects_unknown_units() -> None:
    net = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="not precision units"):
        set_precision_(net, ["1"], torch.float16)
    with pytest.raises(ValueError, match=r"float16 or torch\.bfloat16"):
        set_precision_(net, ["0"], torch.float64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_cast_refuses_a_model_that_is_not_float32(dtype: torch.dtype) -> None:
    net = create_model("lenet5", in_channels=1, input_size=28).eval().to(dtype)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=rf"holds {dtype} tensors; cast_ takes a float32 model"):
        cast_(net, LowPrecisionConfig(dtype="fp16", max_output_error=None, max_accuracy_drop=None))
    assert all(torch.equal(v, before[k]) and v.dtype == dtype for k, v in net.state_dict().items())


def test_a_fused_tucker_layer_is_cast_as_one_unit() -> None:
    from slimtorch.decompose import TuckerConfig, decompose_, fuse_tucker_
    from slimtorch.decompose.fused import FusedTuckerConv2d

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 8 * 8, 4),
    ).eval()  # fmt: skip
    x = torch.randn(4, 3, 8, 8)
    decompose_(net, TuckerConfig(rank=0.5), include=["2"])
    fuse_tucker_(net)
    assert isinstance(net[2], FusedTuckerConv2d)
    with torch.no_grad():
        ref = net(x)
    # its kernel reads first/core/last itself: their own input casts would never run
    report = cast_(net, LowPrecisionConfig(dtype="bf16", keep_fp32=()), check_inputs=x)
    assert "2" in {r.name for r in report.rows} and net[2].core.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = net(x)
    assert out.dtype == torch.float32
    assert float((out - ref).norm() / ref.norm()) < 0.05


def test_precision_gain_takes_only_the_cast_dtypes() -> None:
    # 'int8' and 'fp32' were explained as halving the bytes moved
    from slimtorch.quant.lowp import precision_gain

    assert precision_gain("rx580", "fp16")[0] == "memory"
    for dtype in ("fp32", "int8"):
        with pytest.raises(ValueError, match=f"'fp16' or 'bf16' with fp32, got '{dtype}'"):
            precision_gain("h100-sxm", dtype)


def test_the_slower_estimate_names_its_batch() -> None:
    # compress printed this note beside its own before/after table, taken at another batch
    # and on the model before batch-norm folding, with no word of either
    from slimtorch.models import create_model

    model = create_model("resnet20", in_channels=1, input_size=8).eval()
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    report = cast_(model, LowPrecisionConfig(dtype="fp16"), check_inputs=(x, y),
                   device_profile="rx580")  # fmt: skip
    slower = [n for n in report.notes if n.startswith("estimated slower on rx580")]
    assert len(slower) == 1 and " ms at batch 6, the model as cast_ got it)" in slower[0]
