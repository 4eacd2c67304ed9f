"""ONNX and torch.export models as `slimtorch export` writes them: the docs' config, a config
read from the graph, a missing config.json, and a config checked against the graph at the scan."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from serve_helpers import (
    KEY,
    ONNX_B,
    ONNX_W,
    app_client,
    docs_blocks,
    reference,
    write_config,
    write_onnx,
)
from slimtorch.core.errors import ModelLoadError
from slimtorch.serve import ServeSettings
from slimtorch.serve.onnx_graph import GraphTensor, external_data_files, read_signature
from slimtorch.serve.repository import Repository


def _digits(n: int) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((n, 1, 8, 8), dtype=np.float32)


def _infer(c: TestClient, name: str, x: np.ndarray) -> dict[str, object]:
    body = {
        "inputs": [
            {
                "name": "input",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ]
    }
    r = c.post(f"/v2/models/{name}/infer", json=body)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_docs_onnx_config_serves_what_slimtorch_export_writes(
    tmp_path: Path, digits_model: dict[str, Path]
) -> None:
    onnx_configs = [b for b in docs_blocks("json") if '"format": "onnx"' in b]
    assert len(onnx_configs) == 1
    (tmp_path / "r20-onnx").mkdir()
    (tmp_path / "r20-onnx" / "config.json").write_text(onnx_configs[0])
    (tmp_path / "r20-onnx" / "1").mkdir()
    shutil.copy(digits_model["onnx"], tmp_path / "r20-onnx" / "1" / "model.onnx")
    x = _digits(3)
    with app_client(tmp_path, api_key=KEY) as c:
        r = c.get("/v2/models/r20-onnx/ready")
        assert r.status_code == 200 and r.json()["ready"] is True
        out = _infer(c, "r20-onnx", x)["outputs"][0]  # type: ignore[index]
        assert out["name"] == "output" and out["shape"] == [3, 10]
        got = np.array(out["data"], np.float32).reshape(3, 10)
        torch.testing.assert_close(got, reference(digits_model["dir"], x), atol=1e-4, rtol=1e-4)
        r = c.post("/v1/models/r20-onnx/predict", json={"data": x.tolist()})
        assert r.status_code == 200, r.text
        top = int(got[0].argmax())
        assert r.json()["predictions"][0]["label"] == str(top)


def test_onnx_model_without_config_reads_its_tensors_from_the_graph(
    tmp_path: Path, digits_model: dict[str, Path]
) -> None:
    (tmp_path / "r20-onnx" / "1").mkdir(parents=True)  # models/r20-onnx/1/model.onnx only
    shutil.copy(digits_model["onnx"], tmp_path / "r20-onnx" / "1" / "model.onnx")
    write_config(tmp_path / "partial", max_batch_size=4)  # a config without inputs/outputs
    (tmp_path / "partial" / "1").mkdir()
    shutil.copy(digits_model["onnx"], tmp_path / "partial" / "1" / "model.onnx")
    x = _digits(2)
    with app_client(tmp_path, api_key=KEY) as c:
        cfg = c.get("/v2/models/r20-onnx/config").json()
        assert cfg["format"] == "onnx" and cfg["labels"] == []
        assert cfg["inputs"] == [
            {"name": "input", "datatype": "FP32", "dims": [1, 8, 8], "allow_nan": False}
        ]
        assert cfg["outputs"] == [
            {"name": "output", "datatype": "FP32", "dims": [10], "allow_nan": False}
        ]
        meta = c.get("/v2/models/r20-onnx").json()
        assert meta["platform"] == "onnxruntime_onnx"
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
        assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}]
        assert c.get("/v2/models/r20-onnx/ready").status_code == 200
        for name in ("r20-onnx", "partial"):
            out = _infer(c, name, x)["outputs"][0]  # type: ignore[index]
            got = np.array(out["data"], np.float32).reshape(2, 10)
            torch.testing.assert_close(got, reference(digits_model["dir"], x), atol=1e-4, rtol=1e-4)
        assert c.get("/v2/models/partial/config").json()["max_batch_size"] == 4


def test_missing_config_says_it_is_missing_and_what_to_write(tmp_path: Path) -> None:
    write_onnx(tmp_path / "fixed" / "1" / "model.onnx", ONNX_W, ONNX_B, batch=1)
    with app_client(tmp_path, api_key=KEY) as c:
        r = c.get("/v2/models/fixed/ready")
        assert r.status_code == 503
        assert r.json()["reason"].startswith(
            "fixed/config.json is missing, and cannot read the serving config from "
            "fixed/1/model.onnx: input 'x' has a fixed first dimension 1 instead of "
            "a dynamic batch (with max_batch_size 1 in config.json it is read as the batch); "
            'write config.json, e.g. {"format": "onnx", "inputs": '
        )
    # max_batch_size 1 alone is enough: the tensors are read from the graph
    write_config(tmp_path / "fixed", format="onnx", max_batch_size=1)
    with app_client(tmp_path, api_key=KEY) as c:
        assert c.get("/v2/models/fixed/ready").status_code == 200
        cfg = c.get("/v2/models/fixed/config").json()
        assert cfg["inputs"][0]["dims"] == [4] and cfg["outputs"][0]["dims"] == [3]
    # so is the config that the message shows
    write_config(
        tmp_path / "fixed",
        format="onnx",
        max_batch_size=1,
        inputs=[{"name": "x", "dims": [4]}],
        outputs=[{"name": "y", "dims": [3]}],
    )
    with app_client(tmp_path, api_key=KEY) as c:
        assert c.get("/v2/models/fixed/ready").status_code == 200


@pytest.mark.parametrize("load_policy", ["on_demand", "startup"])
@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (
            {"outputs": [{"name": "logits", "dims": [10]}]},
            "has outputs ['output']; the model config lists ['logits'] that it lacks",
        ),
        (
            {"inputs": [{"name": "pixels", "dims": [1, 8, 8]}]},
            "takes inputs ['input'] but the model config lists ['pixels']",
        ),
        (
            {"inputs": [{"name": "input", "datatype": "FP16", "dims": [1, 8, 8]}]},
            "input 'input' of {path} is FLOAT (FP32) but the model config says FP16",
        ),
        (
            {"inputs": [{"name": "input", "dims": [1, 28, 28]}]},
            "input 'input' of {path} has shape ['?', 1, 8, 8] (batch first) but the model config "
            "says [-1, 1, 28, 28]",
        ),
    ],
)
def test_onnx_config_is_checked_against_the_graph_at_the_scan(
    tmp_path: Path,
    digits_model: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
    load_policy: str,
    change: dict[str, object],
    reason: str,
) -> None:
    config = {
        "format": "onnx",
        "inputs": [{"name": "input", "dims": [1, 8, 8]}],
        "outputs": [{"name": "output", "dims": [10]}],
        **change,
    }
    write_config(tmp_path / "m", **config)
    (tmp_path / "m" / "1").mkdir()
    path = tmp_path / "m" / "1" / "model.onnx"
    shutil.copy(digits_model["onnx"], path)
    reason, full = reason.replace("{path}", "m/1/model.onnx"), reason.replace("{path}", str(path))
    with (
        caplog.at_level("WARNING", logger="slimtorch.serve"),
        app_client(tmp_path, api_key=KEY, load_policy=load_policy) as c,
    ):
        r = c.get("/v2/models/m/ready")
        assert r.status_code == 503 and reason in r.json()["reason"], r.text
        index = c.post("/v2/repository/index", headers={"X-API-Key": KEY}).json()
        assert index[0]["state"] == "UNAVAILABLE" and full in index[0]["reason"]  # the operator's
        x = _digits(1)
        body = {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 1, 8, 8],
                    "datatype": "FP32",
                    "data": x.ravel().tolist(),
                }
            ]
        }
        r = c.post("/v2/models/m/infer", json=body)
        assert r.status_code == 503 and reason in r.json()["error"]
    assert any("model m version 1 is not ready" in m and full in m for m in caplog.messages)


def test_signature_skips_initializers_and_refuses_other_files(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    write_onnx(tmp_path / "a.onnx", ONNX_W, ONNX_B)
    proto = onnx.load(str(tmp_path / "a.onnx"))
    proto.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [4, 3]))
    proto.ir_version = 3  # initializers listed as graph inputs, as old exporters wrote them
    onnx.save(proto, str(tmp_path / "old.onnx"))
    assert read_signature(tmp_path / "old.onnx") == (
        [GraphTensor("x", 1, (None, 4))],
        [GraphTensor("y", 1, (None, 3))],
    )
    whole = (tmp_path / "a.onnx").read_bytes()
    for name, data in (("text", b"not an onnx file"), ("cut", whole[: len(whole) // 2])):
        (tmp_path / f"{name}.onnx").write_bytes(data)
        with pytest.raises(ModelLoadError, match="is not a readable ONNX model"):
            read_signature(tmp_path / f"{name}.onnx")


def _external(path: Path, weight: np.ndarray, **save: object) -> None:
    """``write_onnx``'s graph with its weights saved as external data (``save``: onnx.save's)."""
    import onnx

    write_onnx(path, weight, np.zeros(weight.shape[1], np.float32))
    model = onnx.load(str(path))
    onnx.save(model, str(path), save_as_external_data=True, size_threshold=0, **save)


@pytest.mark.parametrize(
    "save",
    [
        {"all_tensors_to_one_file": True, "location": "weights.bin"},
        {"all_tensors_to_one_file": False},  # one file per tensor, named after it
    ],
)
def test_onnx_external_data_in_any_file_counts_against_the_budget(
    tmp_path: Path, save: dict[str, object]
) -> None:
    # weights in external-data files not named *.data were not counted against the budget
    from slimtorch.serve.runners import allowance_bytes, estimate_memory, load_runner

    weight = np.ones((4, 3000), np.float32)
    _external(tmp_path / "m" / "1" / "model.onnx", weight, **save)
    write_config(tmp_path / "m", format="onnx", max_batch_size=1)
    assert not list((tmp_path / "m" / "1").glob("*.data"))
    with app_client(tmp_path, api_key=KEY, memory_budget_bytes=40_000) as c:
        r = c.get("/v2/models/m/ready")
        assert r.status_code == 503 and "but the memory budget is 40000" in r.json()["reason"]
    folder = tmp_path / "m" / "1"
    on_disk = sum(f.stat().st_size for f in folder.iterdir())
    repo = Repository(tmp_path, ServeSettings())
    repo.scan()
    config = repo.models["m"].config
    assert config is not None
    assert estimate_memory(folder, config) == on_disk + allowance_bytes(config)
    runner = load_runner(folder, config, "cpu")
    assert runner.memory_bytes == on_disk + allowance_bytes(config)
    runner.close()


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/hostname", "a/../../x.bin"])
def test_onnx_external_data_outside_the_version_folder_is_refused(
    tmp_path: Path, location: str
) -> None:
    # a graph could make the server read (and size) any file on the machine
    import onnx
    from onnx.external_data_helper import set_external_data

    path = tmp_path / "m" / "1" / "model.onnx"
    write_onnx(path, ONNX_W, ONNX_B)
    model = onnx.load(str(path))
    weight = model.graph.initializer[0]
    set_external_data(weight, location=location)
    weight.data_location = onnx.TensorProto.EXTERNAL
    weight.ClearField("raw_data")
    weight.ClearField("float_data")
    onnx.save(model, str(path))
    (tmp_path / "outside.bin").write_bytes(ONNX_W.tobytes())
    with app_client(tmp_path, api_key=KEY) as c:
        r = c.get("/v2/models/m/ready")
        assert r.status_code == 503
        assert f"stores weights in external data at {location!r}, outside" in r.json()["reason"]
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        external_data_files(path)
