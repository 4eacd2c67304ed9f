"""ONNX Runtime refusing a graph it loaded: its own error types derive from Exception only, so
they went past every handler as raw tracebacks (a QAT model whose pooled scales ORT's
QLinearGlobalAveragePool cannot take crashed compress after its fine-tune, and export)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from slimtorch.cli import main as cli_main
from slimtorch.core.errors import is_onnxruntime_error
from slimtorch.quant import ort_graph


class Refusal(Exception):
    """Stands for onnxruntime.capi.onnxruntime_pybind11_state.RuntimeException."""


Refusal.__module__ = "onnxruntime.capi.onnxruntime_pybind11_state"


class _Session:
    def __init__(self, refuses: bool) -> None:
        self.refuses = refuses

    def get_inputs(self) -> list[Any]:
        return [type("In", (), {"name": "input"})()]

    def run(self, *args: object) -> list[Any]:
        if self.refuses:
            raise Refusal("QLinearGlobalAveragePool parameter out of computation range!")
        return [None]


def test_time_graphs_leaves_out_a_graph_ort_will_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    assert is_onnxruntime_error(Refusal()) and not is_onnxruntime_error(RuntimeError())
    monkeypatch.setattr(ort_graph, "cpu_session", lambda proto, threads: _Session(proto == "bad"))
    x = torch.zeros(1, 1, 4, 4)
    times = ort_graph.time_graphs({"int8": "bad", "float": "good"}, x, rounds=2, min_time_s=0)
    assert list(times) == ["float"] and len(times["float"]) == 2
    with pytest.raises(ValueError, match=r"ONNX Runtime cannot run the exported graph .*Refusal"):
        ort_graph.time_graphs({"int8": "bad", "float": "bad"}, x, rounds=1, min_time_s=0)


def test_the_command_line_turns_an_ort_refusal_into_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from slimtorch.cli import devices_cmd

    def refuse(args: object) -> int:
        raise Refusal("parameter out of computation range!")

    monkeypatch.setattr(devices_cmd, "run", refuse)
    assert cli_main.main(["devices"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "slimtorch devices: error: ONNX Runtime cannot run the model (Refusal: parameter out "
        "of computation range!)"
    )


def test_an_int8_runtime_that_refuses_the_model_is_recorded_as_not_timed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from slimtorch.models import create_model
    from slimtorch.quant import PTQConfig, int8_runtimes, quantize_

    def refuse(*args: object) -> Any:
        raise Refusal("QLinearGlobalAveragePool parameter out of computation range!")

    monkeypatch.setitem(int8_runtimes._BUILDERS, "onnxruntime", refuse)
    torch.manual_seed(0)
    fp32 = create_model("lenet5", in_channels=1, input_size=28).eval()
    x = torch.randn(4, 1, 28, 28)
    int8 = copy.deepcopy(fp32)
    assert quantize_(int8, PTQConfig(), calibration=x).quantized
    out = int8_runtimes.time_int8_runtimes(fp32, int8, x, runtimes=["onnxruntime"])
    assert out["onnxruntime"].skipped.startswith("Refusal: QLinearGlobalAveragePool")
