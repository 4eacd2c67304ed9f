"""Exact values and refusals of the int8 runtimes: compile_int8_x86's choices, the int8 kernel
counts, the CUDA checks, time_int8_runtimes' records and the ONNX Runtime channels-last pass.

Nothing here compiles or exports: the expensive steps are replaced by stand-ins."""

from __future__ import annotations

import copy
import importlib.util
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from slimtorch.decompose import speed
from slimtorch.decompose.speed import SpeedCheck
from slimtorch.quant import PTQConfig, ort_layout, quantize_, runtime
from slimtorch.quant import int8_runtimes as rt

needs_onnx = pytest.mark.skipif(importlib.util.find_spec("onnx") is None, reason="needs onnx")


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()


@pytest.fixture(scope="module")
def pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    fp32 = _mlp()
    int8 = copy.deepcopy(fp32)
    quantize_(int8, PTQConfig(mode="static"), calibration=[torch.randn(16, 8)])
    return fp32, int8


# ---------------------------------------------------------------- time_int8_runtimes


def test_an_empty_runtime_list_is_refused(pair: tuple[nn.Module, nn.Module]) -> None:
    fp32, int8 = pair
    with pytest.raises(ValueError, match="runtimes must name"):
        rt.time_int8_runtimes(fp32, int8, torch.randn(2, 8), runtimes=())


def test_a_boolean_round_count_is_refused(pair: tuple[nn.Module, nn.Module]) -> None:
    fp32, int8 = pair
    with pytest.raises(ValueError, match="rounds must be an int >= 1, got True"):
        rt.time_int8_runtimes(fp32, int8, torch.randn(2, 8), rounds=True)


def _fake_speed(monkeypatch: pytest.MonkeyPatch) -> None:
    check = SpeedCheck(
        original_s=0.006, factorised_s=0.002, speedup=3.0, source="measured:cpu",
        faster_rounds=4, rounds=5,
    )  # fmt: skip
    monkeypatch.setattr(speed, "layer_speedup", lambda *args, **kwargs: check)


class _Shifted(nn.Module):
    """The int8 model's outputs moved by ``shift``: a runtime whose int8 kernel rounds off."""

    def __init__(self, model: nn.Module, shift: float) -> None:
        super().__init__()
        self.model, self.shift = model, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) + self.shift


def test_a_timed_runtime_records_the_check_and_the_absolute_difference(
    pair: tuple[nn.Module, nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    fp32, int8 = pair
    _fake_speed(monkeypatch)

    def build(f: nn.Module, q: nn.Module, *args: object) -> rt.Built:
        return f, _Shifted(q, -0.25), {"qlinear_pointwise": 2}

    monkeypatch.setitem(rt._BUILDERS, "inductor", build)
    t = rt.time_int8_runtimes(fp32, int8, torch.randn(4, 8), runtimes=["inductor"], threads=1)
    ind = t["inductor"]
    assert ind.skipped is None
    # every output is 0.25 below the eager Q/DQ model's: |-0.25| is the difference
    assert ind.max_abs_diff == pytest.approx(0.25, abs=1e-6)  # float32 rounding of x - 0.25
    assert (ind.fp32_s, ind.int8_s, ind.speedup) == (0.006, 0.002, 3.0)
    assert (ind.rounds, ind.faster_rounds) == (5, 4)
    assert ind.int8_kernels == {"qlinear_pointwise": 2}


def test_an_os_error_while_building_is_recorded_with_its_first_line(
    pair: tuple[nn.Module, nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    fp32, int8 = pair

    def no_space(*args: object) -> rt.Built:
        raise OSError("No space left on device\nwhile writing the compiled kernel")

    monkeypatch.setitem(rt._BUILDERS, "inductor", no_space)
    t = rt.time_int8_runtimes(fp32, int8, torch.randn(2, 8), runtimes=["inductor"])
    assert t["inductor"].skipped == "OSError: No space left on device"


def _fake_onnx(monkeypatch: pytest.MonkeyPatch, session: Any) -> list[str]:
    opened: list[str] = []

    def export(model: nn.Module, path: Path, x: torch.Tensor, **kwargs: object) -> Path:
        return path

    def open_session(path: Path, threads: int) -> Any:
        opened.append(Path(path).name)
        return session(path)

    monkeypatch.setattr(rt, "export_onnx", export)
    monkeypatch.setattr(rt, "ort_session", open_session)
    monkeypatch.setattr(rt, "run_onnx", lambda s, x: x)
    monkeypatch.setattr(rt, "ort_int8_ops", lambda path: {"QGemm": 2})
    return opened


def test_a_value_error_from_onnx_runtime_is_not_disguised_as_a_runtime_failure(
    pair: tuple[nn.Module, nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    fp32, int8 = pair

    def refuse(path: Path) -> Any:
        raise ValueError("threads must be >= 1")

    _fake_onnx(monkeypatch, refuse)
    t = rt.time_int8_runtimes(fp32, int8, torch.randn(2, 8), runtimes=["onnxruntime"])
    assert t["onnxruntime"].skipped == "ValueError: threads must be >= 1"


def test_the_onnx_builder_keeps_the_float_and_int8_sessions_apart(
    pair: tuple[nn.Module, nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    fp32, int8 = pair
    opened = _fake_onnx(monkeypatch, lambda path: Path(path).name)
    f, q, kernels = rt._onnxruntime(fp32, int8, torch.randn(2, 8), 1, None)
    assert opened == ["fp32.onnx", "int8.onnx"]
    assert (f.session, q.session, kernels) == ("fp32.onnx", "int8.onnx", {"QGemm": 2})


# ---------------------------------------------------------------- compile_int8_x86 and friends


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 2)
        self.b = nn.Linear(2, 2).double()


def test_a_model_with_any_float64_weight_is_refused() -> None:
    with pytest.raises(ValueError, match="float64"):
        runtime.compile_int8_x86(_Mixed())


def _no_compile(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []

    def fake_compile(fn: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return fn

    monkeypatch.setattr(runtime, "_register_x86_passes", lambda: None)
    monkeypatch.setattr(torch, "compile", fake_compile)
    return seen


def test_max_autotune_defaults_to_what_the_model_wants(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _no_compile(monkeypatch)
    monkeypatch.setattr(runtime, "wants_max_autotune", lambda model: True)
    net = _mlp()
    assert runtime.compile_int8_x86(net, target="portable").max_autotune is True
    off = runtime.compile_int8_x86(net, target="portable", max_autotune=False)
    assert off.max_autotune is False
    assert seen == [{"dynamic": False}, {"dynamic": False}]


def _wrapper(args: str, source: str, calls: str) -> str:
    return f"cpp_fused_0 = async_compile.cpp_pybinding([{args}], r'''{source}''')\n{calls}"


def test_only_called_int8_gemm_templates_are_counted() -> None:
    int8 = "'const uint8_t*', 'const int8_t*', 'float*'"
    gemm = "void kernel() { micro_gemm(); }"
    # called by name twice; a method of the same name on another object is not the kernel
    code = _wrapper(int8, gemm, "cpp_fused_0(a, w, b)\nother.cpp_fused_0(a)\ncpp_fused_0(b, w, c)")
    assert runtime.kernel_counts([code]) == {runtime.CPP_INT8_GEMM: 2}
    # defined but never called: nothing ran
    assert runtime.kernel_counts([_wrapper(int8, gemm, "")]) == {}


class _FakeCuda(nn.Module):
    """A module whose parameters claim to live on the given devices (no GPU needed)."""

    def __init__(self, *devices: str) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self._devices = devices

    def parameters(self, recurse: bool = True) -> Any:
        yield from (_DevTensor(d) for d in self._devices)


class _DevTensor:
    def __init__(self, device: str) -> None:
        self.device = torch.device(device, 0) if device == "cuda" else torch.device(device)


def test_torchao_refuses_a_model_split_between_cuda_and_cpu() -> None:
    split = r"needs a model on CUDA, got parameters on \['cpu', 'cuda'\]"
    with pytest.raises(ValueError, match=split):
        runtime.torchao_cuda_(_FakeCuda("cuda", "cpu"))


def test_only_dynamic_mode_needs_a_working_int_mm(monkeypatch: pytest.MonkeyPatch) -> None:
    torchao_quantization = pytest.importorskip("torchao.quantization")

    applied: list[str] = []
    monkeypatch.setattr(runtime, "int_mm_problem", lambda device: "fails on cuda:0: no int8 GEMM")
    monkeypatch.setattr(
        torchao_quantization, "quantize_", lambda m, cfg: applied.append(type(cfg).__name__)
    )
    with pytest.raises(ValueError, match="which fails on cuda:0: no int8 GEMM; use mode='weight"):
        runtime.torchao_cuda_(_FakeCuda("cuda"), mode="dynamic")
    assert runtime.torchao_cuda_(_FakeCuda("cuda"), mode="weight_only") == ["fc"]
    assert applied == ["Int8WeightOnlyConfig"]


# ---------------------------------------------------------------- ONNX Runtime channels-last


def _vi(name: str, shape: list[Any]) -> Any:
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info(name, TensorProto.UINT8, shape)


def _scale(name: str, value: float = 0.1) -> Any:
    from onnx import TensorProto, helper

    return helper.make_tensor(name, TensorProto.FLOAT, [], [value])


def _zp(name: str) -> Any:
    from onnx import TensorProto, helper

    return helper.make_tensor(name, TensorProto.UINT8, [], [0])


def _qconv(x: str, y: str) -> Any:
    from onnx import helper

    return helper.make_node(
        "QLinearConv", [x, "s", "z", "w", "s", "z", "s", "z"], [y], name=f"conv_{y}"
    )


def _model(nodes: list[Any], inputs: list[str], output: str, extra: tuple[Any, ...] = ()) -> Any:
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.INT8, [4, 4, 1, 1], [1] * 16)
    inits = [_scale("s"), _zp("z"), w]
    graph = helper.make_graph(
        nodes, "g", [_vi(i, [1, 4, 2, 2]) for i in inputs], [_vi(output, None)], [*inits, *extra]
    )
    return helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 18)])


def _dq(x: str, y: str) -> Any:
    from onnx import helper

    return helper.make_node("DequantizeLinear", [x, "s", "z"], [y], name=f"dq_{y}")


@needs_onnx
def test_a_quantized_add_of_a_constant_map_is_refused() -> None:
    from onnx import TensorProto, helper

    add = helper.make_node(
        "QLinearAdd", ["c", "s", "z", "k", "s", "z", "s", "z"], ["a"], domain="com.microsoft",
        name="add",
    )  # fmt: skip
    k = helper.make_tensor("k", TensorProto.UINT8, [1, 4, 1, 1], [1, 2, 3, 4])
    proto = _model([_qconv("x", "c"), add, _dq("a", "y")], ["x"], "y", (k,))
    with pytest.raises(ort_layout._Refused, match="QLinearAdd add broadcasts a constant"):
        ort_layout._to_channels_last(proto)


@needs_onnx
def test_a_channels_last_graph_output_is_refused() -> None:
    proto = _model([_qconv("x", "y")], ["x"], "y")
    with pytest.raises(ort_layout._Refused, match="a graph output would be channels-last"):
        ort_layout._to_channels_last(proto)


@needs_onnx
def test_per_channel_dequantization_of_a_channels_last_map_is_refused() -> None:
    from onnx import TensorProto, helper

    sc = helper.make_tensor("sc", TensorProto.FLOAT, [4], [0.1, 0.2, 0.3, 0.4])
    dq = helper.make_node("DequantizeLinear", ["c", "sc", "z"], ["y"], name="dq", axis=1)
    proto = _model([_qconv("x", "c"), dq], ["x"], "y", (sc,))
    with pytest.raises(ort_layout._Refused, match="dq is per-channel"):
        ort_layout._to_channels_last(proto)


@needs_onnx
def test_reshaping_a_pooled_map_to_four_dims_is_refused() -> None:
    from onnx import TensorProto, helper

    pool = helper.make_node(
        "QLinearGlobalAveragePool", ["c", "s", "z", "s", "z"], ["p"], domain="com.microsoft",
        name="pool",
    )  # fmt: skip
    shape = helper.make_tensor("shape", TensorProto.INT64, [4], [1, 4, 1, 1])
    reshape = helper.make_node("Reshape", ["p", "shape"], ["r"], name="reshape")
    proto = _model([_qconv("x", "c"), pool, reshape, _dq("r", "y")], ["x"], "y", (shape,))
    with pytest.raises(ort_layout._Refused, match="Reshape reshape reads a channels-last map"):
        ort_layout._to_channels_last(proto)


@needs_onnx
def test_a_channels_last_graph_differing_by_more_than_1e5_is_not_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fused = _model([_qconv("x", "c"), _dq("c", "y")], ["x"], "y")
    monkeypatch.setattr(ort_layout, "_fused_by_ort", lambda proto: fused)
    monkeypatch.setattr(ort_layout, "_to_channels_last", lambda proto: ["one change"])
    monkeypatch.setattr(ort_layout, "_same_outputs", lambda a, b, x: 1e-4)
    proto = object()
    graph, changes = ort_layout.ort_channels_last(proto, torch.zeros(1), log_level=logging.DEBUG)
    assert graph is proto
    assert changes == ["left as Q/DQ: the channels-last graph differs by 0.0001"]
    monkeypatch.setattr(ort_layout, "_same_outputs", lambda a, b, x: 1e-5)
    assert ort_layout.ort_channels_last(proto, torch.zeros(1)) == (fused, ["one change"])


class _Session:
    """An ORT session that runs ``fn`` on its one input."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def get_inputs(self) -> list[Any]:
        return [type("Input", (), {"name": "x"})()]

    def run(self, names: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [self.fn(feed["x"])]


def test_outputs_are_compared_on_the_batch_and_its_negated_copy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the two graphs agree on x = [1, 2] but not on -x: |x| gives 2 where x gives -2
    monkeypatch.setattr(ort_layout, "cpu_session", lambda proto: _Session(proto))
    diff = ort_layout._same_outputs(lambda a: a, np.abs, torch.tensor([[1.0, 2.0]]))
    assert diff == 4.0


def test_a_model_partly_off_the_cpu_is_refused_before_compiling() -> None:
    # only the first tensor was checked: a later one elsewhere failed deep inside inductor
    from slimtorch.quant.runtime import compile_int8_x86

    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2, device="meta"))
    with pytest.raises(ValueError, match="the model is on meta"):
        compile_int8_x86(net, torch.randn(1, 2))
