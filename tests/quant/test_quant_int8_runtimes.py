"""time_int8_runtimes: int8 timed against float in the runtimes that run int8 kernels."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slimtorch.core.measure import count_params
from slimtorch.models import create_model
from slimtorch.quant import PTQConfig, quantize_, time_int8_runtimes
from slimtorch.quant import int8_runtimes as rt

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def pair() -> tuple[nn.Module, nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    fp32 = create_model("lenet5", in_channels=1, input_size=28).eval()
    int8 = copy.deepcopy(fp32)
    calib = [torch.randn(8, 1, 28, 28) for _ in range(2)]
    quantize_(int8, PTQConfig(mode="static"), calibration=calib)
    return fp32, int8, calib


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_both_runtimes_run_int8_kernels_and_leave_the_models_alone(
    pair: tuple[nn.Module, nn.Module, list[torch.Tensor]],
) -> None:
    fp32, int8, calib = pair
    before = (_state(fp32), _state(int8))
    x = torch.randn(4, 1, 28, 28)
    timings = time_int8_runtimes(fp32, int8, x, threads=1, rounds=2, calls=2, calibration=calib)
    assert sorted(timings) == ["inductor", "onnxruntime"]
    ort, ind = timings["onnxruntime"], timings["inductor"]
    for t in (ort, ind):
        assert t.skipped is None and t.batch == 4 and t.threads == 1
        assert t.fp32_s is not None and t.int8_s is not None and t.speedup is not None
        assert t.fp32_s > 0 and t.int8_s > 0
        assert t.speedup == pytest.approx(t.fp32_s / t.int8_s)
        assert t.to_dict()["int8_kernels"] == t.int8_kernels
    # the int8 kernels really ran: ORT's int8 operators, oneDNN's int8 calls in inductor's code
    assert ort.int8_kernels.get("QGemm", 0) >= 2
    assert ind.int8_kernels == {"qconv_pointwise": 2, "qlinear_pointwise": 3}
    # the runtimes' int8 outputs are the Q/DQ model's up to int8 rounding
    assert ind.max_abs_diff is not None and ind.max_abs_diff < 1e-4
    assert ort.max_abs_diff is not None and ort.max_abs_diff < 0.05
    for m, state in zip((fp32, int8), before, strict=True):
        for k, v in m.state_dict().items():
            torch.testing.assert_close(v, state[k], rtol=0, atol=0)


def test_a_runtime_that_cannot_run_is_recorded_with_its_reason(
    pair: tuple[nn.Module, nn.Module, list[torch.Tensor]], monkeypatch: pytest.MonkeyPatch
) -> None:
    fp32, int8, _ = pair

    def missing(*args: object) -> rt.Built:
        raise ImportError("No module named 'onnxruntime'")

    def float_only(f: nn.Module, q: nn.Module, *args: object) -> rt.Built:
        return f, f, {}

    monkeypatch.setitem(rt._BUILDERS, "onnxruntime", missing)
    monkeypatch.setitem(rt._BUILDERS, "inductor", float_only)
    timings = time_int8_runtimes(fp32, int8, torch.randn(2, 1, 28, 28), rounds=1, calls=1)
    assert timings["onnxruntime"].skipped == "ImportError: No module named 'onnxruntime'"
    assert timings["inductor"].skipped == "inductor runs no int8 kernel for this model"
    for t in timings.values():
        assert t.fp32_s is None and t.int8_s is None and t.speedup is None


def test_bad_arguments_raise(pair: tuple[nn.Module, nn.Module, list[torch.Tensor]]) -> None:
    fp32, int8, _ = pair
    x = torch.randn(2, 1, 28, 28)
    with pytest.raises(ValueError, match="no Q/DQ layer"):
        time_int8_runtimes(fp32, fp32, x)
    with pytest.raises(ValueError, match="runtimes must name"):
        time_int8_runtimes(fp32, int8, x, runtimes=["tensorrt"])
    with pytest.raises(ValueError, match="rounds"):
        time_int8_runtimes(fp32, int8, x, rounds=0)
    with pytest.raises(ValueError, match="threads"):
        time_int8_runtimes(fp32, int8, x, threads=0)
    with pytest.raises(TypeError, match="float tensor"):
        time_int8_runtimes(fp32, int8, x.to(torch.uint8))
    with pytest.raises(TypeError, match="reference"):
        time_int8_runtimes("lenet5", int8, x)  # type: ignore[arg-type]


def test_a_quantized_model_keeps_its_weight_count(
    pair: tuple[nn.Module, nn.Module, list[torch.Tensor]],
) -> None:
    fp32, int8, _ = pair
    # int8 weights are buffers; they still count as the model's weights (no batch norm to fold)
    assert count_params(int8) == count_params(fp32)
    biases = sum(p.numel() for p in int8.parameters())
    assert count_params(int8, trainable_only=True) == biases < count_params(fp32) // 10


def test_weight_only_models_are_not_built_and_say_why(
    pair: tuple[nn.Module, nn.Module, list[torch.Tensor]], monkeypatch: pytest.MonkeyPatch
) -> None:
    fp32, _, _ = pair
    weights_only = copy.deepcopy(fp32)
    quantize_(weights_only, PTQConfig(mode="weight_only"))

    def never(*args: object) -> rt.Built:
        raise AssertionError("a weight-only model has nothing for a runtime to build")

    for name in rt.RUNTIMES:
        monkeypatch.setitem(rt._BUILDERS, name, never)
    timings = time_int8_runtimes(fp32, weights_only, torch.randn(3, 1, 28, 28), threads=1)
    assert sorted(timings) == sorted(rt.RUNTIMES)
    for t in timings.values():
        assert t.skipped is not None and t.skipped.startswith("weight-only quantization")
        assert t.batch == 3 and t.threads == 1 and t.speedup is None


def test_an_onnx_runtime_failure_is_recorded_not_raised(
    pair: tuple[nn.Module, nn.Module, list[torch.Tensor]], monkeypatch: pytest.MonkeyPatch
) -> None:
    fp32, int8, _ = pair

    class InvalidGraph(Exception):  # what onnxruntime raises derives from Exception only
        pass

    def broken(*args: object, **kwargs: object) -> object:
        raise InvalidGraph("[ONNXRuntimeError] : 10 : INVALID_GRAPH : node X has no kernel")

    monkeypatch.setattr(rt, "ort_session", broken)
    timings = time_int8_runtimes(
        fp32, int8, torch.randn(2, 1, 28, 28), runtimes=["onnxruntime"], rounds=1, calls=1
    )
    reason = timings["onnxruntime"].skipped
    assert reason is not None and reason.startswith(
        "RuntimeError: ONNX Runtime failed: InvalidGraph"
    )


def test_a_qat_model_with_a_signed_input_runs_int8_in_inductor() -> None:
    from slimtorch.quant import QATConfig, convert_qat_, prepare_qat_

    torch.manual_seed(0)
    fp32 = create_model("lenet5", in_channels=1, input_size=28).eval()
    qat = copy.deepcopy(fp32)
    prepare_qat_(qat, QATConfig())
    x = torch.randn(4, 1, 28, 28)  # normalised images: the stem's input is signed
    fake = qat.eval()(x)
    assert bool(qat.features[0].input_quant.signed)
    convert_qat_(qat)
    torch.testing.assert_close(qat(x), fake, atol=1e-4, rtol=1e-4)  # uint8 + 128 is exact
    t = time_int8_runtimes(fp32, qat, x, runtimes=["inductor"], threads=1, rounds=1, calls=1)
    ind = t["inductor"]
    assert ind.skipped is None, ind.skipped  # oneDNN takes no int8 (signed) input
    assert ind.int8_kernels.get("qconv_pointwise", 0) == 2
    assert ind.max_abs_diff is not None and ind.max_abs_diff < 1e-3


class _Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.relu0, self.relu1 = nn.ReLU(), nn.ReLU()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu1(self.conv(self.relu0(self.stem(x)))).mean((2, 3)))


def test_a_gemm_layout_model_is_compiled_for_inductors_gemm_templates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Convolutions lowered to im2col + linear run fast only as inductor's own GEMM templates:
    both models are compiled with max_autotune, and the template's int8 kernels count."""
    from slimtorch.quant import DirectConvConfig, lower_conv_gemm_, lower_direct_conv_, runtime

    torch.manual_seed(0)
    fp32 = _Small().eval()
    lower_direct_conv_(fp32, DirectConvConfig(channels_last=True))
    assert [r.conv for r in lower_conv_gemm_(fp32).lowered] == ["conv"]
    int8 = copy.deepcopy(fp32)
    quantize_(int8, PTQConfig(mode="static"), calibration=[torch.randn(8, 1, 12, 12)])
    flags: list[object] = []
    compile_int8_x86 = runtime.compile_int8_x86

    def spy(model: nn.Module, *args: object, **kwargs: object) -> runtime.CompiledInt8:
        flags.append(kwargs.get("max_autotune"))
        return compile_int8_x86(model, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(runtime, "compile_int8_x86", spy)
    x = torch.randn(2, 1, 12, 12)
    t = time_int8_runtimes(fp32, int8, x, runtimes=["inductor"], threads=1, rounds=1, calls=1)
    ind = t["inductor"]
    assert flags == [True, True]
    assert ind.skipped is None, ind.skipped
    # the GEMM convolution and the classifier run int8: inductor's template (CPP_INT8_GEMM)
    # where autotuning found it faster, oneDNN's qlinear otherwise
    assert set(ind.int8_kernels) <= {runtime.CPP_INT8_GEMM, "qlinear_pointwise"}
    assert sum(ind.int8_kernels.values()) == 2, ind.int8_kernels
    assert ind.max_abs_diff is not None and ind.max_abs_diff < 1e-3


def test_the_x86_passes_leave_the_users_pre_grad_pass_in_place() -> None:
    # importing torchao's x86 quantizer set inductor's process-wide pre_grad_custom_pass to
    # its own, replacing the user's; a fresh process, as the import happens once
    import subprocess
    import sys

    code = (
        "from torch._inductor import config as c\n"
        "def mine(graph): return None\n"
        "c.pre_grad_custom_pass = mine\n"
        "from slimtorch.quant import runtime\n"
        "runtime._register_x86_passes()\n"
        "assert c.pre_grad_custom_pass is mine, c.pre_grad_custom_pass\n"
        "assert type(runtime._LIFT_UP[0]).__name__ == 'QuantLiftUp', runtime._LIFT_UP\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
