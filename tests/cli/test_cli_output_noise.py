"""What the command line prints and logs says each thing once, whole and readably: per-layer
lines a report table already holds go to debug level, repeated summaries are logged once,
reasons are not cut mid-word, numbers carry their units."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from slimtorch.cli.main import main


def _infos(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno >= 20]


def _debugs(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno < 20]


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()


# -- 8a, 8b: per-layer lines the report's table holds are debug lines --------------------------


def test_decompose_logs_its_layers_at_debug_level(caplog: pytest.LogCaptureFixture) -> None:
    from slimtorch.decompose import SVDConfig, decompose_

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    with caplog.at_level(logging.DEBUG, logger="slimtorch.decompose"):
        report = decompose_(net, SVDConfig(rank=4), include=["0"])
    assert [r.action for r in report.rows] == ["decomposed"]
    assert not any("decompose 0" in m for m in _infos(caplog, "slimtorch.decompose.transform"))
    assert any(
        m.startswith("decompose 0: decomposed ranks")
        for m in _debugs(caplog, "slimtorch.decompose.transform")
    )


def test_channel_pruning_logs_its_groups_at_debug_level(caplog: pytest.LogCaptureFixture) -> None:
    from slimtorch.prune.channel import ChannelPruneConfig, prune_channels_

    net = _net()
    with caplog.at_level(logging.DEBUG, logger="slimtorch.prune.channel"):
        prune_channels_(net, ChannelPruneConfig(ratio=0.5), torch.randn(2, 1, 8, 8))
    logger = "slimtorch.prune.channel.transform"
    assert not any(m.startswith("prune channels") for m in _infos(caplog, logger))
    assert any(m.startswith("prune channels 0: pruned 16 -> 8") for m in _debugs(caplog, logger))


def test_sparsify_logs_its_layers_at_debug_level(caplog: pytest.LogCaptureFixture) -> None:
    from slimtorch.prune import MagnitudeConfig, prune_
    from slimtorch.sparse import sparsify_

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    prune_(net, MagnitudeConfig(sparsity=0.9))
    with caplog.at_level(logging.DEBUG, logger="slimtorch.sparse"):
        report = sparsify_(net, torch.randn(4, 64), formats=("csr",), threads=1, min_time_s=0.0)
    assert len(report.rows) == 2
    assert not any(m.startswith("sparsify ") for m in _infos(caplog, "slimtorch.sparse.sparsify"))
    said = _debugs(caplog, "slimtorch.sparse.sparsify")
    assert sum(m.startswith(("sparsify 0:", "sparsify 2:")) for m in said) == 2


# -- 8c: gradual pruning: one line per pruning step -----------------------------------------


def test_gradual_pruning_logs_one_info_line_per_pruning_step(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from slimtorch.prune import GradualPruning, MagnitudeConfig
    from slimtorch.train import TrainConfig, Trainer
    from train_helpers import ListLoader

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(32, 8, generator=gen), torch.randint(0, 4, (32,), generator=gen)
    gradual = GradualPruning(MagnitudeConfig(sparsity=0.75), start_step=0, end_step=6, frequency=2)
    config = TrainConfig(epochs=2, lr=0.05, schedule="constant", amp="off", progress=False)
    with caplog.at_level(logging.INFO, logger="slimtorch.prune"):
        Trainer(model, config, callbacks=[gradual]).fit(ListLoader(x, y, 8))
    steps = _infos(caplog, "slimtorch.prune.callbacks")
    assert len(steps) == 4 and all(m.startswith("gradual pruning at step") for m in steps)
    assert not [m for m in _infos(caplog, "slimtorch.prune.magnitude") if "prune_ (" in m]


def test_prune_called_alone_still_logs_its_summary(caplog: pytest.LogCaptureFixture) -> None:
    from slimtorch.prune import MagnitudeConfig, prune_

    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="slimtorch.prune"):
        prune_(nn.Sequential(nn.Linear(8, 8)), MagnitudeConfig(sparsity=0.5))
    assert _infos(caplog, "slimtorch.prune.magnitude") == [
        "prune_ (magnitude): 1 layer(s) pruned, 0 skipped; 32 of 64 weights zero"
    ]


# -- 8d: static PTQ folds twice, logs once; the ORT export logs the graph it keeps ------------


def test_static_ptq_in_compress_logs_the_batch_norm_fold_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from slimtorch.pipeline.methods import COMPRESS_METHODS, MethodRequest

    batches = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))) for _ in range(2)]
    request = MethodRequest(
        options={"mode": "static", "runtime_check": False},
        example_input=batches[0][0],
        calibration=lambda: iter(batches),
    )
    with caplog.at_level(logging.DEBUG, logger="slimtorch.quant.fold"):
        COMPRESS_METHODS.get("ptq")(_net(), request)
    line = "fold_bn_: folded 2 of 2 conv+bn pair(s)"
    assert _infos(caplog, "slimtorch.quant.fold") == [line]
    assert _debugs(caplog, "slimtorch.quant.fold") == [line]


def test_fold_logs_the_same_pairs_once_within_repeats_at_debug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from slimtorch.quant.fold import fold_bn_, repeats_at_debug

    with caplog.at_level(logging.INFO, logger="slimtorch.quant.fold"):
        with repeats_at_debug():
            fold_bn_(_net())
            fold_bn_(_net())
        fold_bn_(_net())  # outside the block: every call says it
    assert len(_infos(caplog, "slimtorch.quant.fold")) == 2


def _mean_graph() -> Any:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 1, 1])
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])
    node = helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="mean")
    graph = helper.make_graph([node], "g", [x], [y], [axes])
    return helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 18)])


def test_ort_graph_logs_the_rewrites_of_the_variant_it_keeps_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("onnxruntime")
    from slimtorch.quant import ort_graph

    # both stem variants "change" the model, so both are built, rewritten and timed
    monkeypatch.setattr(ort_graph, "widen_narrow_convs", lambda m: ["0"])
    monkeypatch.setattr(ort_graph, "float_narrow_convs", lambda m: ["0"])
    with caplog.at_level(logging.DEBUG, logger="slimtorch.quant"):
        ort_graph.ort_graph(nn.Identity(), torch.randn(1, 4, 2, 2), lambda m: _mean_graph())
    infos = _infos(caplog, "slimtorch.quant.ort_graph")
    rewrites = "ONNX Runtime rewrites: ['mean: ReduceMean -> GlobalAveragePool']"
    assert infos.count(rewrites) == 1
    assert _debugs(caplog, "slimtorch.quant.ort_graph").count(rewrites) == 2
    assert sum("ONNX Runtime graph (" in m for m in infos) == 1


# -- 9: skip reasons whole; bytes as bytes --------------------------------------------------


def test_a_long_runtime_skip_reason_is_printed_whole_once() -> None:
    from slimtorch.pipeline.report_table import finish_rows

    why = (
        "weight-only quantization: every runtime dequantizes the weights to float, so int8 "
        "saves memory here, not time"
    )
    skipped = {"skipped": why}
    rows = finish_rows({"runtimes": {"inductor": skipped, "onnxruntime": skipped}})
    assert rows[0].split() == ["latency", "inductor", "(ms)", "skipped", "(see", "below)"]
    assert not any("..." in r for r in rows)
    assert [r for r in rows if why in r] == [f"(inductor and onnxruntime not timed: {why})"]
    assert not any("int8 kernels running" in r for r in rows)  # nothing was timed
    short = finish_rows({"runtimes": {"inductor": {"skipped": "no compiler"}}})
    assert short == [f"{'latency inductor (ms)':<26} skipped: no compiler"]


def test_mixed_reasons_give_bytes_as_whole_bytes_and_latency_in_microseconds() -> None:
    from slimtorch.quant.mixed_sensitivity import choice_reason

    losses = {"fp16": 8e-9, "int4": 2.35e-3}
    sizes = {"fp16": 18496.0, "int4": 4866.0}
    assert "int4 saves 13,630 bytes more but adds loss 0.00235" in choice_reason(
        "fp16", losses, sizes, None, ""
    )
    seconds = {"fp16": 3.5e-5, "int4": 2.25e-5}
    assert "int4 saves 12.5 us more" in choice_reason("fp16", losses, seconds, None, "", unit="s")


# -- 10: fp16 and mixed tables: a header row; agreement in percent --------------------------


def test_the_fp16_table_has_a_header_and_agreement_in_percent() -> None:
    from slimtorch.quant.lowp import LowPrecisionReport, PrecisionRow

    report = LowPrecisionReport(
        config={},
        rows=[
            PrecisionRow("conv1", "Conv2d", "float32", "first conv/linear layer"),
            PrecisionRow("layer1.0.conv1", "Conv2d", "float16", "cast to fp16"),
        ],
        checked=True,
        output_error=0.000398,
        agreement=0.998046875,
        size_before=1000,
        size_after=600,
    )
    lines = report.to_table().splitlines()
    assert lines[0].split() == ["layer", "type", "dtype", "reason"]
    assert lines[1].index("Conv2d") == lines[0].index("type")
    assert "output error 0.000398, top-1 agreement 99.80%" in lines
    assert "0.998046875" not in report.to_table()


def test_the_mixed_table_in_compress_has_a_header() -> None:
    from slimtorch.pipeline.methods import COMPRESS_METHODS, MethodRequest

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    batches = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))) for _ in range(2)]
    request = MethodRequest(
        options={"size_ratio": 2.5, "runtime_check": False},
        example_input=batches[0][0],
        calibration=lambda: iter(batches),
    )
    table = COMPRESS_METHODS.get("mixed")(net, request).table.splitlines()
    assert table[0].split() == ["layer", "dtype", "bytes", "reason"]
    assert [line.split()[0] for line in table[1:3]] == ["1", "3"]
    for row in table[1:3]:  # the columns line up under their names
        assert row[table[0].index("reason") :].startswith(("fp16:", "int8:", "int4:"))
        assert row[table[0].index("bytes") :].split()[1] == "->"
    assert table[3].startswith("size ") and table[4].startswith("predicted loss")


# -- 11: serve logs ---------------------------------------------------------------------------


def _uvicorn_record() -> logging.LogRecord:
    return logging.makeLogRecord(
        {
            "name": "uvicorn.error",
            "levelname": "INFO",
            "levelno": logging.INFO,
            "msg": "Started server process [%d]",
            "args": (7785,),
            "color_message": "Started server process [\x1b[36m%d\x1b[0m]",
            "request_id": "-",
        }
    )


def test_json_logs_drop_uvicorns_colour_copy_and_name_uvicorn_plainly() -> None:
    from slimtorch.serve.logs import JsonFormatter

    record = _uvicorn_record()
    record.other = "\x1b[1mbold\x1b[0m"  # any field holding terminal escapes
    record.model = "mlp"
    doc = json.loads(JsonFormatter().format(record))
    assert "color_message" not in doc and "other" not in doc and doc["model"] == "mlp"
    assert doc["logger"] == "uvicorn"
    assert doc["message"] == "Started server process [7785]"


def test_text_logs_name_uvicorn_plainly_and_leave_the_record_as_it_is() -> None:
    from slimtorch.serve.logs import RequestIdFilter, configure_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("text")
        formatter = root.handlers[0].formatter
        assert formatter is not None
        record = _uvicorn_record()
        RequestIdFilter().filter(record)
        assert formatter.format(record) == "INFO uvicorn [-]: Started server process [7785]"
        assert record.name == "uvicorn.error"
    finally:
        root.handlers[:], root.level = saved


def test_the_memory_budget_is_logged_in_gib_and_bytes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio

    from slimtorch.serve.server import ModelServer
    from slimtorch.serve.settings import ServeSettings

    settings = ServeSettings(
        repository=str(tmp_path), device="cpu", threads=1, memory_budget_bytes=20221208166
    )

    async def start_stop() -> None:
        server = ModelServer(settings)
        await server.start()
        await server.stop()

    with caplog.at_level(logging.INFO, logger="slimtorch.serve.server"):
        asyncio.run(start_stop())
    assert "serving 0 model(s); memory budget 18.8 GiB (20,221,208,166 bytes)" in caplog.messages


# -- 12: profile's int8 note fits the kind of int8 --------------------------------------------


def _saved_int8(path: Path, mode: str) -> Path:
    from slimtorch.models import create_model, save_model
    from slimtorch.quant import PTQConfig, quantize_

    torch.manual_seed(0)
    model = create_model("mlp", num_classes=10, in_channels=1, input_size=8).eval()
    calibration = torch.randn(16, 1, 8, 8) if mode == "static" else None
    quantize_(model, PTQConfig(mode=mode), calibration=calibration)
    classes = [str(i) for i in range(10)]
    save_model(model, path, input_shape=(1, 8, 8), mean=[0.0], std=[1.0], class_names=classes)
    return path


@pytest.mark.parametrize("mode", ["weight_only", "static"])
def test_profile_says_which_int8_runs_int8_kernels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str
) -> None:
    model_dir = _saved_int8(tmp_path / mode, mode)
    assert main(["profile", "--in", str(model_dir), "--device", "cpu", "--profiles", "none"]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1
    if mode == "static":
        assert "its int8 kernels run compiled" in notes[0]
    else:
        assert "int8 kernels" not in notes[0] and "ONNX Runtime (slimtorch export" not in notes[0]
        assert "weights are stored int8" in notes[0] and "dequantizes them to float" in notes[0]


def test_quantize_logs_its_bn_fold_once(caplog: pytest.LogCaptureFixture) -> None:
    """quantize_ folds a scratch copy to calibrate it, then the model: one summary line, also
    when called directly (not only under compress)."""
    from slimtorch.quant import PTQConfig, quantize_

    net = _net()
    with caplog.at_level(logging.DEBUG, logger="slimtorch.quant.fold"):
        quantize_(net, PTQConfig(mode="static"), calibration=torch.randn(8, 1, 8, 8))
    lines = [r for r in caplog.records if r.name == "slimtorch.quant.fold"]
    assert [r.levelno for r in lines] == [logging.INFO, logging.DEBUG], lines
