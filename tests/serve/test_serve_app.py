"""Endpoint tests on a real app instance (FastAPI TestClient) over a real model repository."""

from __future__ import annotations

import json
import struct
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
    logged_request_ids,
    make_mlp,
    reference,
    save_slimtorch,
    write_config,
)
from slimtorch.serve import ServeSettings, create_app


def _v2(x: np.ndarray, name: str = "input") -> dict[str, object]:
    return {
        "inputs": [
            {"name": name, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
        ]
    }


def _digits(n: int) -> np.ndarray:
    g = np.random.default_rng(0)
    return g.random((n, 1, 8, 8), dtype=np.float32)


@pytest.mark.parametrize("fast_path", [True, False])
def test_health_metadata_and_json_infer_match_the_model(repo: Path, fast_path: bool) -> None:
    x = _digits(3)
    with app_client(repo, api_key=KEY, fast_path=fast_path) as c:
        assert c.get("/v2/health/live").json() == {"live": True}
        assert c.get("/v2/health/ready").status_code == 200
        meta = c.get("/v2").json()
        assert meta["name"] == "slimtorch" and "binary_tensor_data" in meta["extensions"]
        m = c.get("/v2/models/mlp").json()
        assert m["versions"] == ["1", "2"]
        assert m["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
        # no version: the latest; explicit version 1: that one
        for url, folder in (
            ("/v2/models/mlp/infer", "2"),
            ("/v2/models/mlp/versions/1/infer", "1"),
        ):
            r = c.post(url, json={**_v2(x), "id": "req-7"})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["id"] == "req-7" and body["model_version"] == folder
            out = body["outputs"][0]
            assert out["name"] == "logits" and out["shape"] == [3, 10]
            got = np.array(out["data"], dtype=np.float32).reshape(3, 10)
            torch.testing.assert_close(got, reference(repo / "mlp" / folder, x))
        assert c.get("/v2/models/mlp/versions/2/ready").json()["ready"] is True


def test_config_is_derived_for_a_bare_model_directory(repo: Path) -> None:
    with app_client(repo, api_key=KEY) as c:
        cfg = c.get("/v2/models/plain/config").json()
        assert cfg["format"] == "slimtorch" and cfg["inputs"][0]["dims"] == [1, 8, 8]
        assert cfg["labels"] == [str(i) for i in range(10)]


@pytest.mark.parametrize(("cast", "datatype"), [("double", "FP64"), ("half", "FP32")])
def test_a_bare_float64_or_half_model_directory_serves(
    repo: Path, cast: str, datatype: str
) -> None:
    # the derived config said FP32 logits for every model: a float64 one failed to load,
    # asking for a config the user never wrote
    save_slimtorch(repo / "wide" / "1", getattr(make_mlp(5), cast)())
    x = _digits(2)
    with app_client(repo, api_key=KEY) as c:
        assert c.get("/v2/models/wide/config").json()["outputs"][0]["datatype"] == datatype
        r = c.post("/v2/models/wide/infer", json=_v2(x))
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        assert out["datatype"] == datatype and out["shape"] == [2, 10]


@pytest.mark.parametrize("fast_path", [True, False])
def test_binary_tensor_extension_in_and_out(repo: Path, fast_path: bool) -> None:
    x = _digits(2)
    raw = x.tobytes()
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [2, 1, 8, 8],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
        }
    ).encode()
    with app_client(repo, api_key=KEY) as c:
        r = c.post(
            "/v2/models/mlp/infer",
            content=head + raw,
            headers={
                "Inference-Header-Content-Length": str(len(head)),
                "Content-Type": "application/octet-stream",
            },
        )
        assert r.status_code == 200, r.text
        n = int(r.headers["inference-header-content-length"])
        doc = json.loads(r.content[:n])
        out = doc["outputs"][0]
        assert "data" not in out and out["parameters"]["binary_data_size"] == 2 * 10 * 4
        got = np.frombuffer(r.content[n:], dtype="<f4").reshape(2, 10).copy()
        torch.testing.assert_close(got, reference(repo / "mlp" / "2", x))


def test_exported_and_onnx_models_serve(repo: Path) -> None:
    x = _digits(2)
    with app_client(repo, api_key=KEY) as c:
        r = c.post("/v2/models/exported/infer", json=_v2(x))
        assert r.status_code == 200, r.text
        model = make_mlp(4)
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        got = np.array(r.json()["outputs"][0]["data"], dtype=np.float32).reshape(2, 10)
        torch.testing.assert_close(got, want)
        v = np.array([[1, 2, 3, 4], [0, 0, 0, 1]], dtype=np.float32)
        r = c.post("/v2/models/linear/infer", json=_v2(v, "x"))
        assert r.status_code == 200, r.text
        got = np.array(r.json()["outputs"][0]["data"], dtype=np.float32).reshape(2, 3)
        torch.testing.assert_close(got, v @ ONNX_W + ONNX_B)


def test_simple_json_endpoint_gives_labels(repo: Path) -> None:
    x = _digits(1)
    with app_client(repo, api_key=KEY) as c:
        r = c.post("/v1/models/plain/predict", json={"data": x[0].tolist()})
        assert r.status_code == 200, r.text
        body = r.json()
        logits = reference(repo / "plain" / "1", x)
        assert body["predictions"][0]["index"] == int(logits.argmax())
        assert body["predictions"][0]["label"] == str(int(logits.argmax()))
        assert 0 < body["predictions"][0]["score"] <= 1
        r = c.post("/v1/models/plain/predict", json={"data": x.tolist()})  # a batch of one
        assert len(r.json()["outputs"]["logits"]) == 1
        r = c.post("/v1/models/plain/predict", json={"data": [[1, 2]]})
        assert r.status_code == 400 and "[-1, 1, 8, 8]" in r.json()["error"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (
            {
                "inputs": [
                    {"name": "input", "shape": [1, 1, 8, 7], "datatype": "FP32", "data": [0.0] * 56}
                ]
            },
            "[-1, 1, 8, 8]",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "pixels",
                        "shape": [1, 1, 8, 8],
                        "datatype": "FP32",
                        "data": [0.0] * 64,
                    }
                ]
            },
            "unexpected ['pixels']",
        ),
        (
            {
                "inputs": [
                    {"name": "input", "shape": [1, 1, 8, 8], "datatype": "INT32", "data": [0] * 64}
                ]
            },
            "datatype FP32",
        ),
        (
            {
                "inputs": [
                    {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": ["a"] * 64}
                ]
            },
            "inputs[0].data",
        ),
        (
            {
                "inputs": [
                    {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 63}
                ]
            },
            "holds 63 values",
        ),
        (
            {"inputs": [{"name": "input", "shape": [1, "x"], "datatype": "FP32", "data": [0.0]}]},
            "inputs[0].shape[1]",
        ),
        (
            {
                "inputs": [
                    {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP99", "data": [0.0] * 64}
                ]
            },
            "inputs[0].datatype",
        ),
        ({"inputs": []}, "inputs"),
        ({"inputz": []}, "inputz"),
        (
            {
                "inputs": [
                    {
                        "name": "input",
                        "shape": [17, 1, 8, 8],
                        "datatype": "FP32",
                        "data": [0.0] * 17 * 64,
                    }
                ]
            },
            "max_batch_size 16",
        ),
        (  # an empty tensor whose other dimension numpy cannot index
            {"inputs": [{"name": "input", "shape": [0, 10**20], "datatype": "FP32", "data": []}]},
            "inputs[0].shape [0, 100000000000000000000] has a dimension too large",
        ),
    ],
)
def test_bad_requests_get_400_naming_the_field(repo: Path, body: dict, field: str) -> None:
    with app_client(repo, api_key=KEY) as c:
        r = c.post("/v2/models/mlp/infer", json=body)
        assert r.status_code == 400, r.text
        assert field in r.json()["error"]


@pytest.mark.parametrize("fast_path", [True, False])
def test_malformed_json_nan_and_size_limit(repo: Path, fast_path: bool) -> None:
    with app_client(repo, api_key=KEY, max_request_bytes=4096, fast_path=fast_path) as c:
        r = c.post("/v2/models/mlp/infer", content=b'{"inputs": [')
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
        nan = b'{"inputs":[{"name":"input","shape":[1,1,8,8],"datatype":"FP32","data":[NaN'
        r = c.post("/v2/models/mlp/infer", content=nan + b",0" * 63 + b"]}]}")
        assert r.status_code == 400 and "NaN" in r.json()["error"]
        r = c.post("/v2/models/mlp/infer", content=b"0" * 5000)
        assert r.status_code == 413 and "4096" in r.json()["error"]

        def chunks():  # no Content-Length: the limit applies to the streamed bytes
            for _ in range(10):
                yield b" " * 1000

        r = c.post("/v2/models/mlp/infer", content=chunks())
        assert r.status_code == 413
        assert c.get("/v2/health/ready").status_code == 200


def test_unknown_model_and_version(repo: Path) -> None:
    with app_client(repo, api_key=KEY) as c:
        r = c.post("/v2/models/nope/infer", json=_v2(_digits(1)))
        assert r.status_code == 404 and "repository index lists them" in r.json()["error"]
        assert c.get("/v2/models/mlp/versions/9").status_code == 404
        assert c.get("/v2/models/nope/ready").status_code == 404


@pytest.mark.parametrize("fast_path", [True, False])
@pytest.mark.parametrize("version", ["\u00b2", "9" * 5000])
def test_version_that_int_refuses_is_404(repo: Path, fast_path: bool, version: str) -> None:
    # str.isdigit() accepts both, int() raises on both (a superscript, more than 4300 digits)
    with app_client(repo, api_key=KEY, fast_path=fast_path) as c:
        for r in (
            c.post(f"/v2/models/mlp/versions/{version}/infer", json=_v2(_digits(1))),
            c.get(f"/v2/models/mlp/versions/{version}/ready"),
            c.get(f"/v2/models/mlp/versions/{version}"),
            c.post(
                "/v1/models/mlp/predict", json={"data": _digits(1).tolist(), "version": version}
            ),
        ):
            assert r.status_code == 404, r.text
            assert "model 'mlp' has no version" in r.json()["error"]
            assert "serves versions [1, 2]" in r.json()["error"]


def test_simple_json_endpoint_reads_json_whatever_the_content_type(repo: Path) -> None:
    body = json.dumps({"data": _digits(1)[0].tolist()}).encode()
    with app_client(repo, api_key=KEY) as c:
        for content_type in ("application/x-www-form-urlencoded", "text/plain", None):  # curl -d
            headers = {} if content_type is None else {"Content-Type": content_type}
            r = c.post("/v1/models/plain/predict", content=body, headers=headers)
            assert r.status_code == 200, (content_type, r.text)
            assert len(r.json()["predictions"]) == 1
        r = c.post("/v1/models/plain/predict", content=b'{"daat": [1]}')
        assert r.status_code == 400
        assert r.json()["error"] == "data: Field required; daat: Extra inputs are not permitted"


def test_unknown_routes_and_methods_answer_in_the_error_format(repo: Path) -> None:
    with app_client(repo, api_key=KEY) as c:
        r = c.get("/v2/models/mlp/infer")
        assert r.status_code == 405 and r.json() == {"error": "Method Not Allowed"}
        assert r.headers["allow"] == "POST"
        r = c.post("/v2/trace/setting")
        assert r.status_code == 404 and r.json() == {"error": "Not Found"}


def test_corrupt_model_is_not_ready_and_others_keep_serving(repo: Path) -> None:
    # corrupt weights, a missing file and a config with the wrong output shape
    (repo / "plain" / "1" / "model.safetensors").write_bytes(b"\x00garbage")
    (repo / "exported" / "1" / "model.pt2").unlink()
    write_config(
        repo / "wrongshape",
        format="slimtorch",
        inputs=[{"name": "input", "dims": [1, 8, 8]}],
        outputs=[{"name": "logits", "dims": [12]}],
    )
    save_slimtorch(repo / "wrongshape" / "1", make_mlp(5))
    (repo / "badjson").mkdir()
    (repo / "badjson" / "config.json").write_text("{not json")
    (repo / "badjson" / "1").mkdir()
    with app_client(repo, api_key=KEY) as c:
        for name, why in (
            ("plain", "corrupt"),
            ("exported", "missing"),
            ("badjson", "not valid JSON"),
        ):
            r = c.get(f"/v2/models/{name}/ready")
            assert r.status_code == 503 and why in r.json()["reason"], (name, r.text)
            r = c.post(f"/v2/models/{name}/infer", json=_v2(_digits(1)))
            assert r.status_code == 503 and why in r.json()["error"]
        # the wrong output shape shows at load (first request), then the model is not ready
        r = c.post("/v2/models/wrongshape/infer", json=_v2(_digits(1)))
        assert r.status_code == 503 and "[-1, 12]" in r.json()["error"]
        assert c.get("/v2/models/wrongshape/ready").status_code == 503
        r = c.post("/v2/models/mlp/infer", json=_v2(_digits(2)))
        assert r.status_code == 200
        index = c.post("/v2/repository/index", headers={"X-API-Key": KEY}).json()
        states = {row["name"]: row["state"] for row in index}
        assert states["plain"] == "UNAVAILABLE" and states["mlp"] == "READY"
        assert states["linear"] == "AVAILABLE"
        assert c.get("/v2/health/ready").status_code == 200


def test_management_requires_key_and_unload_load_rescan(repo: Path) -> None:
    with app_client(repo, api_key=KEY) as c:
        assert c.post("/v2/repository/index").status_code == 401
        assert (
            c.post("/v2/repository/index", headers={"X-API-Key": "wrong-key!"}).status_code == 401
        )
        h = {"X-API-Key": KEY}
        r = c.post("/v2/repository/models/linear/load", headers=h)
        assert r.status_code == 200 and r.json()[0]["state"] == "READY"
        r = c.post("/v2/repository/models/linear/unload", headers=h)
        assert r.json()[0]["state"] == "UNLOADED"
        v = np.zeros((1, 4), np.float32)
        assert c.post("/v2/models/linear/infer", json=_v2(v, "x")).status_code == 503
        assert c.get("/v2/models/linear/ready").status_code == 503
        c.post("/v2/repository/models/linear/load", headers=h)
        assert c.post("/v2/models/linear/infer", json=_v2(v, "x")).status_code == 200
        # a model added on disk appears after a rescan
        save_slimtorch(repo / "added" / "1", make_mlp(6))
        assert c.get("/v2/models/added").status_code == 404
        names = {row["name"] for row in c.post("/v2/repository/rescan", headers=h).json()}
        assert "added" in names
        assert c.post("/v2/models/added/infer", json=_v2(_digits(1))).status_code == 200
    with TestClient(create_app(ServeSettings(repository=str(repo), device="cpu"))) as c:
        r = c.post("/v2/repository/index", headers={"X-API-Key": KEY})
        assert r.status_code == 403 and "SLIMTORCH_SERVE_API_KEY" in r.json()["error"]


def test_metrics_and_request_id(repo: Path) -> None:
    with app_client(repo, api_key=KEY) as c:
        r = c.post(
            "/v2/models/mlp/infer", json=_v2(_digits(2)), headers={"X-Request-ID": "abc-123"}
        )
        assert r.headers["x-request-id"] == "abc-123"
        assert len(c.get("/v2").headers["x-request-id"]) == 32
        c.post("/v2/models/mlp/infer", json={"inputs": []})
        text = c.get("/metrics").text
        assert (
            'slimtorch_serve_requests_total{endpoint="infer",model="mlp",status="200"} 1.0' in text
        )
        assert (
            'slimtorch_serve_requests_total{endpoint="infer",model="mlp",status="400"} 1.0' in text
        )
        assert 'slimtorch_serve_batch_size_count{model="mlp:2"} 1.0' in text
        assert "slimtorch_serve_models_loaded 1.0" in text
        used = [ln for ln in text.splitlines() if ln.startswith("slimtorch_serve_memory_used")]
        assert float(used[0].split()[-1]) > 0


def test_logs_written_while_a_request_runs_carry_its_id(repo: Path) -> None:
    """A model loaded on demand logs from a worker thread; the log still names the request."""
    with logged_request_ids() as seen, app_client(repo, api_key=KEY) as c:
        r = c.post(
            "/v2/models/mlp/infer", json=_v2(_digits(2)), headers={"X-Request-ID": "abc-123"}
        )
        assert r.status_code == 200, r.text
    loaded = {rid for msg, rid in seen if msg.startswith("loaded mlp")}
    assert loaded == {"abc-123"}, seen


def test_openapi_documents_the_protocol(repo: Path) -> None:
    with app_client(repo, api_key=KEY) as c:
        spec = c.get("/openapi.json").json()
        assert "/v2/models/{model_name}/infer" in spec["paths"]
        assert "InferenceRequest" in spec["components"]["schemas"]
        assert "RequestInput" in spec["components"]["schemas"]
        assert c.get("/docs").status_code == 200


def test_int_and_binary_bytes_checks(tmp_path: Path) -> None:
    from serve_helpers import write_onnx

    write_config(
        tmp_path / "lin",
        format="onnx",
        inputs=[{"name": "x", "datatype": "FP32", "dims": [4]}],
        outputs=[{"name": "y", "datatype": "FP32", "dims": [3]}],
    )
    write_onnx(tmp_path / "lin" / "1" / "model.onnx", ONNX_W, ONNX_B)
    with app_client(tmp_path, api_key=KEY) as c:
        head = json.dumps(
            {
                "inputs": [
                    {
                        "name": "x",
                        "shape": [1, 4],
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": 16},
                    }
                ]
            }
        ).encode()
        raw = struct.pack("<4f", 1, 2, 3, 4)
        r = c.post(
            "/v2/models/lin/infer",
            content=head + raw[:12],
            headers={"Inference-Header-Content-Length": str(len(head))},
        )
        assert r.status_code == 400 and "binary" in r.json()["error"]
        r = c.post(
            "/v2/models/lin/infer",
            content=head + raw,
            headers={"Inference-Header-Content-Length": "99999"},
        )
        assert r.status_code == 400 and "Inference-Header-Content-Length" in r.json()["error"]
        r = c.post(
            "/v2/models/lin/infer",
            content=head + raw,
            headers={"Inference-Header-Content-Length": str(len(head))},
        )
        assert r.status_code == 200
        got = np.array(r.json()["outputs"][0]["data"], dtype=np.float32)
        torch.testing.assert_close(got, np.array([1, 2, 3, 4], np.float32) @ ONNX_W + ONNX_B)
