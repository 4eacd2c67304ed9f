"""The repository scan: a broken model folder is reported as not ready, never stops the scan."""

from __future__ import annotations

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
    make_mlp,
    save_slimtorch,
    write_config,
    write_onnx,
)
from slimtorch.serve import ServeSettings, create_app
from slimtorch.serve.repository import Repository

_IN8 = [{"name": "input", "datatype": "FP32", "dims": [1, 8, 8]}]
_OUT10 = [{"name": "logits", "datatype": "FP32", "dims": [10]}]


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ({"versions": 5}, "ModelConfig.versions must be 'latest', 'all' or a non-empty list"),
        ({"versions": True}, "ModelConfig.versions must be 'latest', 'all' or a non-empty list"),
        ({"device": 5}, "ModelConfig.device must be a device name"),
        ({"device": ["cpu"]}, "ModelConfig.device must be a device name"),
    ],
)
def test_config_field_of_the_wrong_type_marks_only_that_model_broken(
    tmp_path: Path, field: dict[str, object], message: str
) -> None:
    save_slimtorch(tmp_path / "good" / "1", make_mlp(1))
    write_config(tmp_path / "bad", format="slimtorch", inputs=_IN8, outputs=_OUT10, **field)
    save_slimtorch(tmp_path / "bad" / "1", make_mlp(2))
    settings = ServeSettings(repository=str(tmp_path), device="cpu", threads=1)
    with TestClient(create_app(settings)) as c:  # the server starts
        r = c.get("/v2/models/bad/ready")
        assert r.status_code == 503 and message in r.json()["reason"]
        x = {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}
        assert c.post("/v2/models/good/infer", json={"inputs": [x]}).status_code == 200


def test_folder_name_of_digits_int_refuses_is_not_a_version(tmp_path: Path) -> None:
    save_slimtorch(tmp_path / "m" / "1", make_mlp(1))
    (tmp_path / "m" / "\u00b2").mkdir()  # str.isdigit() is true, int() raises
    repo = Repository(tmp_path, ServeSettings())
    assert repo.scan() == {"m"}
    assert repo.models["m"].error == "" and list(repo.models["m"].versions) == [1]


def test_dynamic_image_sizes_warm_up_at_the_size_the_model_was_trained_on(tmp_path: Path) -> None:
    # the warm-up ran a 1x1 image, which vgg11-bn's pooling cannot take, so a config with
    # dims [1, -1, -1] made the model unavailable although it serves every size it was built for
    from slimtorch.models import create_model, save_model
    from slimtorch.serve.model_config import ModelConfig, TensorSpec
    from slimtorch.serve.runners import load_runner

    torch.manual_seed(0)
    vgg = create_model("vgg11-bn", in_channels=1, input_size=16).eval()
    save_model(vgg, tmp_path / "1", input_shape=(1, 16, 16), mean=[0.5], std=[0.5],
               class_names=list("0123456789"))  # fmt: skip
    config = ModelConfig(name="vgg", format="slimtorch",
                         inputs=(TensorSpec(name="input", dims=(1, -1, -1)),),
                         outputs=(TensorSpec(name="logits", dims=(10,)),))  # fmt: skip
    runner = load_runner(tmp_path / "1", config, "cpu")
    out = runner.run({"input": np.zeros((2, 1, 32, 32), np.float32)})
    assert out["logits"].shape == (2, 10)
    runner.close()


def test_a_model_unloaded_through_the_api_stays_unloaded_across_rescans(tmp_path: Path) -> None:
    # a rescan that re-read an unloaded model (any file written into its folder) made it ready
    write_onnx(tmp_path / "lin" / "1" / "model.onnx", ONNX_W, ONNX_B)
    key = {"X-API-Key": KEY}
    with app_client(tmp_path, api_key=KEY) as c:
        assert c.post("/v2/repository/models/lin/unload", headers=key).status_code == 200
        (tmp_path / "lin" / "README.txt").write_text("notes")
        assert c.post("/v2/repository/rescan", headers=key).status_code == 200
        r = c.get("/v2/models/lin/ready")
        assert r.status_code == 503 and "unloaded" in r.json()["reason"], r.text
        index = c.post("/v2/repository/index", headers=key).json()
        assert [row["state"] for row in index] == ["UNLOADED"]
        assert c.post("/v2/repository/models/lin/load", headers=key).status_code == 200
        (tmp_path / "lin" / "README.txt").write_text("more notes")
        assert c.post("/v2/repository/rescan", headers=key).status_code == 200
        assert c.get("/v2/models/lin/ready").status_code == 200


def test_a_deleted_versions_unload_mark_goes_with_it(tmp_path: Path) -> None:
    # the marks of deleted versions piled up (one per version rotated out), and a new folder of
    # a deleted version's number came back UNLOADED
    import shutil

    write_onnx(tmp_path / "lin" / "1" / "model.onnx", ONNX_W, ONNX_B)
    key = {"X-API-Key": KEY}
    with app_client(tmp_path, api_key=KEY) as c:
        assert c.post("/v2/repository/models/lin/unload", headers=key).status_code == 200
        shutil.rmtree(tmp_path / "lin" / "1")
        assert c.post("/v2/repository/rescan", headers=key).status_code == 200
        assert c.app.state.server.repository.unloaded == set()  # type: ignore[attr-defined]
        write_onnx(tmp_path / "lin" / "1" / "model.onnx", ONNX_W, ONNX_B)
        assert c.post("/v2/repository/rescan", headers=key).status_code == 200
        index = c.post("/v2/repository/index", headers=key).json()
        assert [row["state"] for row in index] != ["UNLOADED"], index
        assert c.get("/v2/models/lin/ready").status_code == 200


def test_the_series_of_retired_versions_and_removed_models_leave_the_metrics(
    tmp_path: Path,
) -> None:
    # every version a rescan retired, and every model deleted, kept its series in every scrape
    import shutil

    io = {"inputs": [{"name": "x", "dims": [4]}], "outputs": [{"name": "y", "dims": [3]}]}
    write_config(tmp_path / "lin", format="onnx", versions="all", **io)
    for v in ("1", "2"):
        write_onnx(tmp_path / "lin" / v / "model.onnx", ONNX_W, ONNX_B)
    write_onnx(tmp_path / "other" / "1" / "model.onnx", ONNX_W, ONNX_B)
    key = {"X-API-Key": KEY}
    x = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}
    with app_client(tmp_path, api_key=KEY) as c:
        for path in ("lin/versions/1", "lin/versions/2", "other"):
            assert c.post(f"/v2/models/{path}/infer", json={"inputs": [x]}).status_code == 200
        text = c.get("/metrics").text
        assert 'model="lin:1"' in text and 'model="lin:2"' in text and 'model="other"' in text
        shutil.rmtree(tmp_path / "lin" / "1")  # one version left: its batcher is "lin"
        shutil.rmtree(tmp_path / "other")
        assert c.post("/v2/repository/rescan", headers=key).status_code == 200
        assert c.post("/v2/models/lin/infer", json={"inputs": [x]}).status_code == 200
        text = c.get("/metrics").text
        assert 'model="lin:1"' not in text and 'model="lin:2"' not in text
        assert 'model="other' not in text
        assert 'slimtorch_serve_batch_size_count{model="lin"}' in text


def test_config_json_is_read_as_utf8_whatever_the_locale(tmp_path: Path) -> None:
    # read_text() without an encoding reads the locale's code page (cp1252 on Windows, ASCII
    # under LC_ALL=C): a hand-written config with "Zürich" in its labels was "not valid JSON"
    import json
    import os
    import subprocess
    import sys

    write_config(tmp_path / "m", format="slimtorch", inputs=_IN8, outputs=_OUT10,
                 labels=["Zürich", "東京", *map(str, range(8))])  # fmt: skip
    config = tmp_path / "m" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()), ensure_ascii=False), "utf-8")
    save_slimtorch(tmp_path / "m" / "1", make_mlp(1))
    probe = (
        "import sys; from slimtorch.serve import ServeSettings; "
        "from slimtorch.serve.repository import Repository; from pathlib import Path; "
        f"r = Repository(Path({str(tmp_path)!r}), ServeSettings()); r.scan(); e = r.models['m']; "
        "print(ascii([e.error, list(e.config.labels or [])[:2] if e.config else None]))"
    )
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == ascii(["", ["Zürich", "東京"]]), out.stdout


def test_forgetting_series_never_recorded_works_with_older_prometheus_clients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # prometheus-client before 0.22 raises KeyError removing a label set never recorded: a
    # rescan that removed a model then failed before its start-up loads
    from slimtorch.serve.metrics import ServeMetrics

    m = ServeMetrics()
    m.observe_request("mlp", "infer", 200, 0.01)

    def strict(*labels: str) -> None:
        raise KeyError(labels)

    for family in (m.loads, m.evictions, m.queue_depth, m.batch_size, m.batch_seconds):
        monkeypatch.setattr(family, "remove", strict)
    m.forget_models(["mlp"])
    m.forget_batchers(["mlp:1"])
    assert b'model="mlp"' not in m.render()[0]


def test_an_unload_mark_survives_a_briefly_broken_config(tmp_path: Path) -> None:
    # a scan that read the model with an error (a half-written config) dropped the mark, and
    # the unloaded version came back ready once the config was whole again
    write_onnx(tmp_path / "lin" / "1" / "model.onnx", ONNX_W, ONNX_B)
    key = {"X-API-Key": KEY}
    with app_client(tmp_path, api_key=KEY) as c:
        assert c.post("/v2/repository/models/lin/unload", headers=key).status_code == 200
        (tmp_path / "lin" / "config.json").write_text("{")  # an editor's half-written save
        assert c.post("/v2/repository/rescan", headers=key).status_code == 200
        (tmp_path / "lin" / "config.json").write_text("{}")  # the edit lands
        assert c.post("/v2/repository/rescan", headers=key).status_code == 200
        index = c.post("/v2/repository/index", headers=key).json()
        assert [row["state"] for row in index] == ["UNLOADED"], index
        assert c.get("/v2/models/lin/ready").status_code == 503
