"""A real uvicorn server on loopback: tritonclient unchanged, and no request lost under overload."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import torch

from serve_helpers import free_port, live_server, reference, save_slimtorch, write_config
from slimtorch.data.idx import read_idx
from slimtorch.models import create_model, save_model
from slimtorch.serve import ServeSettings


def test_tritonclient_http_works_unchanged(tmp_path: Path, shared_data: Path) -> None:
    import tritonclient.http as httpclient

    torch.manual_seed(0)
    model = create_model("mlp", num_classes=10, in_channels=1, input_size=28, hidden=(32,))
    save_model(
        model,
        tmp_path / "mnist" / "1",
        input_shape=(1, 28, 28),
        mean=[0.0],
        std=[1.0],
        class_names=[str(i) for i in range(10)],
    )
    images = read_idx(shared_data / "mnist" / "t10k-images-idx3-ubyte.gz")[:5]
    x = (images.astype(np.float32) / 255.0).reshape(5, 1, 28, 28)
    want = reference(tmp_path / "mnist" / "1", x)
    settings = ServeSettings(
        repository=str(tmp_path),
        port=free_port(),
        device="cpu",
        threads=1,
        access_log=False,
        api_key="management-key",
    )
    with live_server(settings) as url:
        client = httpclient.InferenceServerClient(url=url)
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("mnist")
        meta = client.get_model_metadata("mnist")
        assert meta["inputs"][0]["shape"] == [-1, 1, 28, 28]
        assert client.get_server_metadata()["name"] == "slimtorch"
        for binary_in in (True, False):
            for binary_out in (True, False):
                inp = httpclient.InferInput("input", list(x.shape), "FP32")
                inp.set_data_from_numpy(x, binary_data=binary_in)
                out = httpclient.InferRequestedOutput("logits", binary_data=binary_out)
                result = client.infer("mnist", [inp], outputs=[out], request_id="r1")
                got = np.array(result.as_numpy("logits"))
                torch.testing.assert_close(got, want)
                assert result.get_response()["id"] == "r1"
        for algorithm in ("gzip", "deflate"):  # Content-Encoding on the request body
            inp = httpclient.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=True)
            result = client.infer("mnist", [inp], request_compression_algorithm=algorithm)
            torch.testing.assert_close(np.array(result.as_numpy("logits")), want)
        # model repository extension with the management key
        headers = {"X-API-Key": "management-key"}
        index = client.get_model_repository_index(headers=headers)
        assert index[0]["name"] == "mnist"
        client.unload_model("mnist", headers=headers)
        assert not client.is_model_ready("mnist")
        client.load_model("mnist", headers=headers)
        assert client.is_model_ready("mnist")
        client.close()


def test_no_request_lost_under_overload(tmp_path: Path) -> None:
    torch.manual_seed(0)
    write_config(
        tmp_path / "r20",
        format="slimtorch",
        max_batch_size=1,
        max_queue_size=2,
        inputs=[{"name": "input", "dims": [3, 32, 32]}],
        outputs=[{"name": "logits", "dims": [10]}],
    )
    model = create_model("resnet20", num_classes=10, in_channels=3, input_size=32)
    save_model(
        model,
        tmp_path / "r20" / "1",
        input_shape=(3, 32, 32),
        mean=[0.0],
        std=[1.0],
        class_names=[str(i) for i in range(10)],
    )
    save_slimtorch(
        tmp_path / "small" / "1",
        create_model("mlp", num_classes=10, in_channels=1, input_size=8, hidden=(8,)),
    )
    x = np.random.default_rng(0).random((1, 3, 32, 32), dtype=np.float32)
    body = {
        "inputs": [
            {
                "name": "input",
                "shape": [1, 3, 32, 32],
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ]
    }
    settings = ServeSettings(
        repository=str(tmp_path),
        port=free_port(),
        device="cpu",
        threads=1,
        access_log=False,
        load_policy="startup",
    )
    n = 120

    async def fire(url: str) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(base_url=f"http://{url}", limits=limits, timeout=60) as client:
            return await asyncio.gather(
                *(client.post("/v2/models/r20/infer", json=body) for _ in range(n))
            )

    with live_server(settings) as url:
        responses = asyncio.run(fire(url))
        codes = [r.status_code for r in responses]
        assert len(codes) == n and set(codes) <= {200, 503}, codes
        refused = [r for r in responses if r.status_code == 503]
        assert refused, "the load did not overload the server; the test proves nothing"
        assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
        assert all("full" in r.json()["error"] for r in refused)
        assert codes.count(200) >= 1
        ok = next(r for r in responses if r.status_code == 200)
        torch.testing.assert_close(
            np.array(ok.json()["outputs"][0]["data"], np.float32).reshape(1, 10),
            reference(tmp_path / "r20" / "1", x),
            rtol=1e-4,
            atol=1e-4,
        )
        # the other model answers while the first one is swamped, and the server is healthy
        metrics = httpx.get(f"http://{url}/metrics").text
        assert 'status="503"' in metrics
        assert httpx.get(f"http://{url}/v2/health/ready").status_code == 200
