"""docs/serve.md's examples: its config examples parse, and its input example sends what the
model saw in training (the server does not normalise) and predicts the digit it shows."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from fastapi.testclient import TestClient

from serve_helpers import docs_blocks, reference
from slimtorch.data import DeviceLoader
from slimtorch.data.digits import load_digits_dataset
from slimtorch.serve import ServeSettings, create_app
from slimtorch.serve.model_config import parse_model_config


def test_docs_config_examples_parse() -> None:
    configs = [json.loads(b) for b in docs_blocks("json")]
    assert [c["format"] for c in configs] == ["slimtorch", "onnx"]
    for data in configs:
        parse_model_config(data, name="m", settings=ServeSettings())


def _docs_request(model_dir: Path) -> tuple[dict[str, list[object]], dict[str, list[object]]]:
    """The body the docs' Python example builds, and the one its curl line sends."""
    (code,) = [b for b in docs_blocks("python") if "load_digits" in b]
    assert '"runs/demo/model/config.json"' in code
    scope: dict[str, object] = {}
    exec(code.replace("runs/demo/model", str(model_dir)), scope)
    (curl,) = [b for b in docs_blocks("bash") if "/v1/models/demo/predict" in b]
    sent = re.search(r"-d '(.*?)'", curl, flags=re.S)
    assert sent is not None
    return scope["body"], json.loads(sent.group(1))  # type: ignore[return-value]


def test_docs_input_example_is_the_training_input_and_predicts_the_digit(
    tmp_path: Path, digits_model: dict[str, Path]
) -> None:
    body, curl = _docs_request(digits_model["dir"])
    # the training input of the same image: slimtorch's digits, normalised by its loader
    x, labels = next(iter(DeviceLoader(load_digits_dataset("all"), 1, device="cpu")))
    assert int(labels[0]) == 0
    np.testing.assert_allclose(np.array(body["data"]), x[:, 0].numpy(), atol=1e-6)
    np.testing.assert_allclose(np.array(curl["data"]), x[:, 0].numpy(), atol=0.005 + 1e-6)
    shutil.copytree(digits_model["dir"], tmp_path / "demo" / "1")
    with TestClient(create_app(ServeSettings(repository=str(tmp_path), device="cpu"))) as c:
        for sent in (body, curl):
            r = c.post("/v1/models/demo/predict", content=json.dumps(sent))
            assert r.status_code == 200, r.text
            (pred,) = r.json()["predictions"]
            assert pred["index"] == 0 and pred["label"] == "0" and pred["score"] > 0.9
        got = np.array(r.json()["outputs"]["logits"], np.float32)
        want = reference(digits_model["dir"], np.array(curl["data"], np.float32)[:, None])
        torch.testing.assert_close(got, want)
