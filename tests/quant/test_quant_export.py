"""ONNX export (fp32, fp16, int8 Q/DQ) checked against PyTorch in ONNX Runtime; int8 kernels."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from slimtorch.models import create_model
from slimtorch.quant.export import (
    check_onnx,
    compare_onnx,
    export_onnx,
    ort_int8_ops,
    ort_session,
    run_onnx,
)
from slimtorch.quant.ort_graph import widen_narrow_convs
from slimtorch.quant.ort_layout import ort_channels_last
from slimtorch.quant.ptq import PTQConfig, quantize_


class _Res(nn.Module):
    """A conv stem, one residual block and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(1, 8, 3, padding=1)
        self.relu0 = nn.ReLU()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu0(self.conv0(x))
        x = self.relu1(self.bn1(self.conv1(x)) + x)
        return self.fc(torch.flatten(self.pool(x), 1))


def _hand_mixed() -> nn.Module:
    """model.half() with its batch norm set back to float32 by hand: no casts between them."""
    m = _model().half()
    m.bn1.float()
    return m


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = _Res()
    with torch.no_grad():
        m.bn1.running_mean.uniform_(-0.1, 0.1)
        m.bn1.running_var.uniform_(0.5, 1.5)
    return m.eval()


def test_fp32_and_int8_qdq_match_pytorch(tmp_path) -> None:
    model = _model()
    x = torch.randn(32, 1, 10, 10, generator=torch.Generator().manual_seed(2))
    fp32 = export_onnx(model, tmp_path / "m.onnx", x[:1])
    ref = model(x).detach()
    assert compare_onnx(model, fp32, x) <= 1e-4 + 1e-5 * float(ref.abs().max())
    qmodel = copy.deepcopy(model)
    quantize_(qmodel, PTQConfig(mode="static"), calibration=[x])
    int8 = export_onnx(qmodel, tmp_path / "q.onnx", x[:1], narrow_convs="int8")
    with torch.no_grad():
        qref = qmodel(x)
    got = run_onnx(ort_session(int8, threads=1), x)
    assert float((got - qref).abs().max()) <= 0.05 * float(qref.abs().max())
    assert float((got.argmax(1) == qref.argmax(1)).float().mean()) >= 0.9
    ops = ort_int8_ops(int8)
    assert ops.get("QLinearConv", 0) == 2 and ops.get("QLinearAdd", 0) == 1
    assert ort_int8_ops(fp32) == {}
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write left no temporary file


def test_symmetric_activations_warn_for_onnxruntime_only(tmp_path: Path) -> None:
    """ORT on x86 leaves int8 (symmetric) activations in float: the export says so."""
    import warnings

    x = torch.randn(16, 1, 10, 10, generator=torch.Generator().manual_seed(3))
    sym = _model()
    quantize_(sym, PTQConfig(mode="static", symmetric=True), calibration=[x])
    with pytest.warns(UserWarning, match=r"conv0 \(and \d+ more\).*symmetric=False"):
        path = export_onnx(sym, tmp_path / "s.onnx", x[:1], narrow_convs="int8")
    assert ort_int8_ops(path).get("QLinearAdd", 0) == 0  # what the warning is about
    affine = _model()
    quantize_(affine, PTQConfig(mode="static"), calibration=[x])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_onnx(sym, tmp_path / "p.onnx", x[:1], target="portable")
        export_onnx(affine, tmp_path / "a.onnx", x[:1], narrow_convs="int8")


def test_fp16_export_and_errors(tmp_path) -> None:
    model = _model()
    x = torch.randn(4, 1, 10, 10)
    fp16 = export_onnx(model, tmp_path / "h.onnx", x, dtype="fp16", dynamic_batch=False)
    assert ort_session(fp16).get_inputs()[0].type == "tensor(float16)"
    # workers do not spin between runs unless asked: sessions timed in turn share the cores
    key = "session.intra_op.allow_spinning"
    assert ort_session(fp16, 2).get_session_options().get_session_config_entry(key) == "0"
    spinning = ort_session(fp16, 2, spin=True).get_session_options()
    assert spinning.get_session_config_entry(key) == "1"
    with torch.no_grad():
        ref = model.half()(x.half()).float()
    assert compare_onnx(model, fp16, x) <= 1e-2 * float(ref.abs().max())
    with pytest.raises(ValueError, match="dtype must be"):
        export_onnx(model, tmp_path / "x.onnx", x, dtype="int4")
    qmodel = _model()
    quantize_(qmodel, PTQConfig(mode="weight_only"))
    with pytest.raises(ValueError, match="fp16 export of an int8"):
        export_onnx(qmodel, tmp_path / "x.onnx", x, dtype="fp16")
    dyn = _model()
    quantize_(dyn, PTQConfig(mode="dynamic"))
    with pytest.raises(ValueError, match="dynamic-quantization"):
        export_onnx(dyn, tmp_path / "x.onnx", x)


def test_cast_models_export_only_in_the_precision_they_have(tmp_path: Path) -> None:
    from slimtorch.quant.precision import set_precision_

    x = torch.randn(2, 1, 10, 10)
    for make_bf16 in (
        lambda m: m.to(torch.bfloat16),
        lambda m: set_precision_(m, ["conv1"], torch.bfloat16),
    ):
        model = _model()
        make_bf16(model)
        with pytest.raises(ValueError, match=r"conv.* hold bfloat16 weights, which ONNX Runtime"):
            export_onnx(model, tmp_path / "b.onnx", x)
        assert not (tmp_path / "b.onnx").exists()
    half = _model()
    set_precision_(half, ["conv1"], torch.float16)  # as compress --method fp16 leaves a model
    with pytest.raises(ValueError, match=r"already cast \(fp32 input, float16 in 1 of"):
        export_onnx(half, tmp_path / "h.onnx", x, dtype="fp16")
    path = export_onnx(half, tmp_path / "h.onnx", x)  # fp32: its layers as they are
    assert compare_onnx(half, path, x) < 1e-2
    # a whole model in float16 or float64, or an empty example batch: named, nothing written
    for model, example, what in (
        (_model().half(), x, r"every weight of the model is float16 \(model\.half\(\)\)"),
        (_hand_mixed(), x, r"mixes float16 and float32 weights without the casts cast_ records"),
        (_model().double(), x, r"the model holds float64 weights; export model\.float\(\)"),
        (_model(), x[:0], r"example_input has no rows \(shape \(0, 1, 10, 10\)\)"),
    ):
        with pytest.raises(ValueError, match=what):
            export_onnx(model, tmp_path / "n.onnx", example)
        assert not (tmp_path / "n.onnx").exists()
    with pytest.raises(ValueError, match="at most 65536 rows"):
        export_onnx(_model(), tmp_path / "big.onnx", torch.randn(65537, 1, 10, 10))


@pytest.mark.slow
def test_x86_compile_runs_onednn_int8_kernels() -> None:
    from slimtorch.quant.runtime import compile_int8_x86, cpu_int8_support, int8_kernels

    if not cpu_int8_support()["onednn"]:
        pytest.skip("no oneDNN in this PyTorch build")
    model = _model()
    x = torch.randn(8, 1, 10, 10)
    quantize_(model, PTQConfig(mode="static"), calibration=[x])
    kernels = int8_kernels(model, x)  # conv1 + residual add (+ ReLU) fused into one kernel
    assert kernels == {"qconv_pointwise": 1, "qconv2d_pointwise.binary": 1, "qlinear_pointwise": 1}
    portable = int8_kernels(model, x, target="portable")
    assert portable.get("qconv_pointwise", 0) == 2 and portable.get("qlinear_pointwise", 0) == 1
    fast = compile_int8_x86(model, x)
    torch.testing.assert_close(fast(x), model(x).detach(), atol=0.1, rtol=0.05)


@pytest.mark.gpu
def test_torchao_cuda_linear_int8() -> None:
    from slimtorch.quant.runtime import torchao_cuda_

    if not torch.cuda.is_available():
        pytest.fail("gpu-marked test needs CUDA")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 64)).cuda().bfloat16()
    x = torch.randn(32, 256, device="cuda", dtype=torch.bfloat16)
    ref = model(x).float()
    for mode in ("weight_only", "dynamic"):
        m = copy.deepcopy(model)
        assert torchao_cuda_(m, mode) == ["0", "2"]
        out = m(x).float()
        assert float((out - ref).abs().max()) <= 0.05 * float(ref.abs().max()) + 0.05


def test_int_mm_problem_names_gpus_without_an_int8_gemm(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch._int_mm checks no GPU generation: on the RX 580 (no hipBLASLt) dynamic int8 failed
    # in the first forward, after the model had been changed
    from slimtorch.quant import runtime

    assert runtime.int_mm_problem(torch.device("cpu")) is None

    def no_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("CUDA error: HIPBLAS_STATUS_NOT_SUPPORTED\nmore")

    monkeypatch.setattr(torch, "_int_mm", no_gemm)
    problem = runtime.int_mm_problem(torch.device("cpu"))
    assert problem == "fails on cpu: CUDA error: HIPBLAS_STATUS_NOT_SUPPORTED"
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: torch.zeros(32, 8, dtype=torch.int32))
    assert "wrong results" in str(runtime.int_mm_problem(torch.device("cpu")))


def _static_int8(name: str, *, seed: int) -> nn.Module:
    """A fresh 28x28 grey zoo model, static int8 on random calibration batches."""
    torch.manual_seed(seed)
    model = create_model(name, in_channels=1, input_size=28).eval()
    calib = [(torch.randn(8, 1, 28, 28), torch.zeros(8, dtype=torch.long)) for _ in range(2)]
    quantize_(model, PTQConfig(mode="static"), calibration=calib)
    return model


def test_onnxruntime_export_widens_narrow_int8_stems(tmp_path: Path) -> None:
    """A 1-channel int8 stem gets zero input channels up to 4 in the ORT export: same outputs."""
    import onnx

    model = _static_int8("resnet20", seed=0)
    wide = copy.deepcopy(model)
    assert widen_narrow_convs(wide) == ["conv1"]
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(wide(x), model(x), rtol=0, atol=0)
    assert model.conv1.in_channels == 1  # the original is untouched
    path = export_onnx(model, tmp_path / "m.onnx", x[:1], target="onnxruntime", narrow_convs="int8")
    assert next(n.op_type for n in onnx.load(path).graph.node) == "Pad"
    assert compare_onnx(model, path, x) <= 0.05 * float(model(x).detach().abs().max())


def _attrs(node: object) -> dict[str, object]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}  # type: ignore[attr-defined]


def test_onnxruntime_export_is_fused_channels_last_with_a_float_stem(tmp_path: Path) -> None:
    """resnet20 for ORT: float stem, then QLinearConv NHWC throughout, one transpose, pooled
    map flattened without transposing back, classifier weights float; outputs as in PyTorch."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = _static_int8("resnet20", seed=1)
    x = torch.randn(6, 1, 28, 28)
    path = export_onnx(
        model, tmp_path / "m.onnx", x[:1], target="onnxruntime", narrow_convs="float"
    )
    graph = onnx.load(path).graph
    ops = [(n.domain, n.op_type) for n in graph.node]
    assert ops[0][1] in ("Conv", "FusedConv")  # the stem reads the float input directly
    qconvs = [n for n in graph.node if n.op_type == "QLinearConv"]
    assert len(qconvs) == 20 and all(n.domain == "com.microsoft" for n in qconvs)
    assert all(_attrs(n)["channels_last"] == 1 for n in qconvs)
    pool = [n for n in graph.node if n.op_type == "QLinearGlobalAveragePool"]
    assert len(pool) == 1 and _attrs(pool[0])["channels_last"] == 1
    assert [op for _, op in ops].count("Transpose") == 1
    assert "ReduceMean" not in [op for _, op in ops] and ops.count(("", "QuantizeLinear")) == 1
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    gemm = next(n for n in graph.node if n.op_type == "Gemm")
    assert inits[gemm.input[1]].dtype == np.float32 and "fc.weight_int8" not in inits
    assert compare_onnx(model, path, x) <= 0.05 * float(model(x).detach().abs().max())
    portable = export_onnx(model, tmp_path / "p.onnx", x[:1], target="portable")
    assert "ReduceMean" in [n.op_type for n in onnx.load(portable).graph.node]


def test_channels_last_pass_leaves_unknown_consumers_to_ort(tmp_path: Path) -> None:
    """lenet5's max-pooling reads the int8 maps: the pass returns the Q/DQ graph unchanged."""
    import onnx

    model = _static_int8("lenet5", seed=3)
    x = torch.randn(1, 1, 28, 28)
    proto = onnx.load(export_onnx(model, tmp_path / "p.onnx", x, target="portable"))
    graph, changes = ort_channels_last(proto, x)
    assert graph is proto and len(changes) == 1 and changes[0].startswith("left")
    assert "MaxPool" in changes[0] or "QLinearConv" in changes[0]
    with pytest.raises(ValueError, match="narrow_convs"):
        export_onnx(model, tmp_path / "x.onnx", x, target="onnxruntime", narrow_convs="fp8")
    assert not (tmp_path / "x.onnx").exists()


def test_ort_rewrites_keep_hidden_linear_layers_int8(tmp_path: Path) -> None:
    """Only the classifier's weights are stored dequantized; hidden linears stay QGemm."""
    import onnx

    model = _static_int8("lenet5", seed=2)
    path = export_onnx(model, tmp_path / "q.onnx", torch.randn(1, 1, 28, 28), target="onnxruntime")
    inits = {i.name for i in onnx.load(path).graph.initializer}
    assert {"fc1.weight_int8", "fc2.weight_int8"} <= inits
    assert "classifier.weight_int8" not in inits
    assert ort_int8_ops(path).get("QGemm") == 2


def test_channels_last_pass_handles_float_elementwise_ops(tmp_path: Path) -> None:
    """mobilenetv2's float residual adds and clips read int8 maps: they stay channels-last too."""
    import onnx

    torch.manual_seed(4)
    model = create_model("mobilenetv2", in_channels=3, input_size=32)
    with torch.no_grad():  # batch-norm statistics of the inputs, so activations do not vanish
        for _ in range(10):
            model(torch.randn(16, 3, 32, 32))
    model.eval()
    calib = [(torch.randn(16, 3, 32, 32), torch.zeros(16, dtype=torch.long)) for _ in range(2)]
    quantize_(model, PTQConfig(mode="static"), calibration=calib)
    x = torch.randn(4, 3, 32, 32)
    path = export_onnx(
        model, tmp_path / "m.onnx", x[:1], calibration=calib, narrow_convs="int8"
    )  # fmt: skip
    nodes = onnx.load(path).graph.node
    qconvs = [n for n in nodes if n.op_type == "QLinearConv"]
    assert qconvs and all(_attrs(n)["channels_last"] == 1 for n in qconvs)
    assert [n.op_type for n in nodes].count("Transpose") == 1
    ref = float(model(x).detach().abs().max())
    assert ref > 0.01 and compare_onnx(model, path, x) <= 0.05 * ref


def test_a_model_with_two_outputs_is_named_not_compared_on_its_first(tmp_path: Path) -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.a(x), self.b(x)

    model = Two().eval()
    path = export_onnx(model, tmp_path / "two.onnx", torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"has 2 outputs .*one output tensor"):
        compare_onnx(model, path, torch.randn(4, 8))


class _TokenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fc = nn.Embedding(100, 16), nn.Linear(16, 5)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(idx).mean(1))


@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_a_model_taking_token_ids_exports_and_checks(tmp_path: Path, weights: str) -> None:
    # the example input was cast to float, so an embedding model could not be exported
    torch.manual_seed(0)
    model = _TokenNet().eval()
    if weights == "int8":
        quantize_(model, PTQConfig(mode="weight_only"))
    idx = torch.randint(0, 100, (4, 12))
    path = export_onnx(model, tmp_path / "tokens.onnx", idx)
    check = check_onnx(model, path, torch.randint(0, 100, (8, 12)))
    assert check["max_abs_diff"] < 1e-4 and check["top1_agreement"] == 1.0


class _ValueBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) if x.sum() > 0 else self.b(x)


def test_a_failed_export_names_torch_exports_reason_quietly(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # the error said only "step 1/3 ... Next steps:" and ~100 lines of graph went to stderr
    with pytest.raises(ValueError, match=r"failed \(GuardOnDataDependentSymNode: .*control flow"):
        export_onnx(_ValueBranch().eval(), tmp_path / "branch.onnx", torch.randn(2, 8))
    assert "def forward" not in capfd.readouterr().err
    assert not (tmp_path / "branch.onnx").exists()


def test_a_channels_last_model_exports(tmp_path: Path) -> None:
    # the dynamo exporter failed on channels-last weights ("Invalid ranges [2:1]"), which every
    # model trained with channels_last and loaded back now has
    model = create_model("resnet20", in_channels=1, input_size=12).eval()
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    x = torch.randn(4, 1, 12, 12)
    path = export_onnx(model, tmp_path / "cl.onnx", x[:1])  # batch 1: where it failed
    assert compare_onnx(model, path, x) <= 1e-4
    assert model.get_submodule("conv1").weight.is_contiguous(memory_format=torch.channels_last)
