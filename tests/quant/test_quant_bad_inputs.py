"""Bad inputs to the quant API: clear errors or recorded skips, the model left as it was."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from model_helpers import same_model
from slimtorch.core.errors import ModelLoadError
from slimtorch.models import create_model, load_model, save_model
from slimtorch.quant import (
    LowPrecisionConfig,
    PTQConfig,
    QATConfig,
    cast_,
    export_onnx,
    ort_session,
    prepare_qat_,
    quantize_,
    run_onnx,
)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    ).eval()  # fmt: skip


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.emb = nn.Embedding(4, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x)[0])


def test_layers_without_int8_form_are_recorded_and_the_model_still_runs() -> None:
    model = _Attn().eval()
    report = quantize_(model, PTQConfig(mode="weight_only"))
    rows = {r.name: (r.action, r.reason or "") for r in report.rows}
    assert rows["head"][0] == "quantized"
    assert (
        rows["attn"][0] == "skipped" and "no int8 kernel for MultiheadAttention" in rows["attn"][1]
    )
    assert rows["emb"][0] == "skipped" and "Embedding" in rows["emb"][1]
    action, reason = rows["attn.out_proj"]
    assert action == "skipped" and "NonDynamicallyQuantizableLinear subclasses nn.Linear" in reason
    assert model(torch.randn(2, 3, 8)).shape == (2, 3, 2)  # out_proj stays a float Linear


def test_tied_weights_are_skipped_with_the_reason_and_stay_tied() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 3)).eval()
    model[2].weight = model[0].weight
    x = torch.randn(4, 8)
    report = quantize_(model, PTQConfig(mode="static"), calibration=x)
    rows = {r.name: (r.action, r.reason or "") for r in report.rows}
    assert rows["3"][0] == "quantized"
    for name in ("0", "2"):
        assert rows[name][0] == "skipped" and "tied weights" in rows[name][1]
    assert model[2].weight is model[0].weight
    qat = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 3))
    qat[2].weight = qat[0].weight
    qreport = prepare_qat_(qat, QATConfig())
    assert qreport.layers == ["3"]
    assert set(qreport.skipped) == {"0", "2"} and "tied weights" in qreport.skipped["0"]
    assert qat[2].weight is qat[0].weight


def test_quantizing_twice_or_a_qat_model_records_skips_and_changes_nothing() -> None:
    x = torch.randn(8, 1, 8, 8)
    model = _net()
    quantize_(model, PTQConfig(mode="static"), calibration=x)
    before = copy.deepcopy(model)
    report = quantize_(model, PTQConfig(mode="weight_only"))
    assert [(r.name, r.action) for r in report.rows] == [("0", "skipped"), ("3", "skipped")]
    assert "already an int8 QDQConv2d" in (report.rows[0].reason or "")
    assert same_model(model, before)
    qat = _net()
    prepare_qat_(qat, QATConfig())
    qat(x)
    before = copy.deepcopy(qat)
    report = quantize_(qat, PTQConfig(mode="weight_only"))
    assert all(r.action == "skipped" and "convert_qat_" in (r.reason or "") for r in report.rows)
    assert same_model(qat, before)
    with pytest.raises(ValueError, match=r"already holds int8 Q/DQ layers \(0, 3\)"):
        prepare_qat_(model, QATConfig())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_calibration_data_names_the_dtype(dtype: torch.dtype) -> None:
    model, before = _net(), _net()
    with pytest.raises(ValueError, match=rf"batch 0 has dtype {dtype} but the model's weights"):
        quantize_(model, PTQConfig(mode="static"), calibration=torch.randn(4, 1, 8, 8, dtype=dtype))
    assert same_model(model, before)
    with pytest.raises(ValueError, match=rf"dtype {dtype} does not fit the model"):
        cast_(
            model, LowPrecisionConfig(dtype="fp16"), check_inputs=torch.randn(4, 1, 8, 8).to(dtype)
        )
    assert same_model(model, before)


def test_meta_calibration_data_is_refused() -> None:
    with pytest.raises(ValueError, match="batch 0 is on the meta device"):
        quantize_(
            _net(), PTQConfig(mode="static"), calibration=torch.empty(4, 1, 8, 8, device="meta")
        )


def test_cast_refuses_an_int8_model() -> None:
    model = _net()
    quantize_(model, PTQConfig(mode="weight_only"))
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"int8 Q/DQ layer\(s\) 0, 3 cannot be cast"):
        cast_(model, LowPrecisionConfig(dtype="fp16"))
    assert same_model(model, before)


def test_saved_nan_weight_scale_is_refused_on_load(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model = create_model("lenet5", in_channels=1, input_size=28).eval()
    quantize_(model, PTQConfig(mode="weight_only"))
    save_model(model, tmp_path / "m", input_shape=(1, 28, 28), mean=[0.0], std=[1.0],
               class_names=[str(i) for i in range(10)])  # fmt: skip
    file = tmp_path / "m" / "model.safetensors"
    tensors = load_file(file)
    tensors["fc1.weight_scale"][0] = float("nan")
    save_file(tensors, file)
    with pytest.raises(ModelLoadError, match=r"fc1\.weight_scale holds NaN/Inf or non-positive"):
        load_model(tmp_path / "m")


def test_run_onnx_and_ort_session_bad_inputs(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    path = export_onnx(_net(), tmp_path / "m.onnx", torch.randn(1, 1, 8, 8))
    session = ort_session(path)
    with pytest.raises(
        ValueError, match=r"input of shape \(1, 3, 8, 8\) does not fit .* 1, 8, 8\)"
    ):
        run_onnx(session, torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"input of shape \(1, 8, 8\) does not fit"):
        run_onnx(session, torch.randn(1, 8, 8))
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor, got ndarray"):
        run_onnx(session, torch.randn(1, 1, 8, 8).numpy())
    with pytest.raises(FileNotFoundError, match="no ONNX file at"):
        ort_session(tmp_path / "missing.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(ValueError, match=r"ONNX Runtime cannot load .*bad\.onnx"):
        ort_session(tmp_path / "bad.onnx")


def test_fused_tucker_layers_are_refused_by_the_onnx_export(tmp_path: Path) -> None:
    from slimtorch.decompose import TuckerConv2d
    from slimtorch.decompose.fused import FusedTuckerConv2d

    tucker = TuckerConv2d(4, 3, 3, (2, 2), padding=1).eval()
    model = nn.Sequential(FusedTuckerConv2d.from_tucker(tucker, relu=True)).eval()
    with pytest.raises(ValueError, match=r"^0 is a FusedTuckerConv2d: .* no ONNX"):
        export_onnx(model, tmp_path / "f.onnx", torch.randn(1, 4, 6, 6))
    assert not (tmp_path / "f.onnx").exists()


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, k: int) -> torch.Tensor:
        return self.fc(x) * k


class _Pooled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


def test_batches_the_model_cannot_take_get_a_clear_error() -> None:
    # an unbatched image made the model raise IndexError, a two-input model TypeError: both
    # escaped raw from calibration and the cast's check
    two, pooled = _TwoInputs().eval(), _Pooled().eval()
    before = copy.deepcopy(two)
    for call in (
        lambda: quantize_(two, PTQConfig(mode="static"), calibration=[torch.randn(4, 8)]),
        lambda: cast_(two, LowPrecisionConfig(), check_inputs=torch.randn(4, 8)),
    ):
        with pytest.raises(ValueError, match=r"TypeError: .*missing.*several inputs"):
            call()
    assert same_model(two, before)
    with pytest.raises(ValueError, match=r"\(3, 16, 16\).*IndexError"):
        quantize_(pooled, PTQConfig(mode="static"), calibration=[torch.randn(3, 16, 16)])
