"""The simple JSON endpoint: ``data`` is a list of items, and the top class comes with or
without labels."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from serve_helpers import (
    IN8,
    ONNX_B,
    ONNX_W,
    app_client,
    make_mlp,
    reference,
    save_slimtorch,
    write_config,
    write_onnx,
)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_predict_without_labels_gives_the_class_index(
    tmp_path: Path, digits_model: dict[str, Path], fmt: str
) -> None:
    outputs = [{"name": "output" if fmt == "onnx" else "logits", "dims": [10]}]
    fmt_name = "onnx" if fmt == "onnx" else "torch_export"
    write_config(tmp_path / "m", format=fmt_name, inputs=IN8, outputs=outputs)  # no labels
    (tmp_path / "m" / "1").mkdir()
    shutil.copy(digits_model[fmt], tmp_path / "m" / "1" / f"model.{fmt}")
    x = np.random.default_rng(2).standard_normal((3, 1, 8, 8), dtype=np.float32)
    with app_client(tmp_path) as c:
        r = c.post("/v1/models/m/predict", json={"data": x.tolist()})
        assert r.status_code == 200, r.text
    want = reference(digits_model["dir"], x)
    got = r.json()["predictions"]
    assert [p["index"] for p in got] == want.argmax(axis=1).tolist()
    assert [p["label"] for p in got] == [None, None, None]
    np.testing.assert_allclose([p["score"] for p in got], _softmax(want).max(axis=1), rtol=1e-4)


def test_predict_reads_data_as_a_list_of_items(tmp_path: Path) -> None:
    write_config(tmp_path / "mlp", format="slimtorch", inputs=IN8,
                 outputs=[{"name": "logits", "dims": [10]}])  # fmt: skip
    save_slimtorch(tmp_path / "mlp" / "1", make_mlp(3))
    write_config(tmp_path / "lin", format="onnx", inputs=[{"name": "x", "dims": [4]}],
                 outputs=[{"name": "y", "dims": [3]}])  # fmt: skip
    write_onnx(tmp_path / "lin" / "1" / "model.onnx", ONNX_W, ONNX_B)
    imgs = np.random.default_rng(3).random((2, 1, 8, 8), dtype=np.float32)
    a, b = imgs[0, 0].tolist(), imgs[1, 0].tolist()
    with app_client(tmp_path) as c:
        for data, rows in (
            ([a], [0]),  # one bare 8x8 item
            ([a, b], [0, 1]),  # two bare 8x8 items (was a 400)
            ([[a]], [0]),  # one item of the full [1, 8, 8]
            ([[a], [b]], [0, 1]),
        ):
            r = c.post("/v1/models/mlp/predict", json={"data": data})
            assert r.status_code == 200, r.text
            got = np.array(r.json()["outputs"]["logits"], np.float32)
            want = reference(tmp_path / "mlp" / "1", imgs[rows])
            torch.testing.assert_close(got, want)
            assert [p["index"] for p in r.json()["predictions"]] == want.argmax(1).tolist()
        for data, item in ((a, "[8]"), ([[[a]]], "[1, 1, 8, 8]"), ([[1, 2]], "[2]")):
            r = c.post("/v1/models/mlp/predict", json={"data": data})
            assert r.status_code == 400
            n = len(data)
            assert r.json()["error"] == (
                "request.data must be a list of items of shape [1, 8, 8] or [8, 8] (input "
                "'input' takes [-1, 1, 8, 8], batch first, -1 = any size); got "
                f"{n} item(s) of shape {item}; send one item as [item]"
            )
        r = c.post("/v1/models/lin/predict", json={"data": [[1, 2, 3, 4], [0, 0, 0, 1]]})
        assert r.status_code == 200
        v = np.array([[1, 2, 3, 4], [0, 0, 0, 1]], np.float32)
        torch.testing.assert_close(
            np.array(r.json()["outputs"]["y"], np.float32), v @ ONNX_W + ONNX_B
        )
        r = c.post("/v1/models/lin/predict", json={"data": [1, 2, 3, 4]})
        assert r.status_code == 400
        assert r.json()["error"] == (
            "request.data must be a list of items of shape [4] (input 'x' takes [-1, 4], batch "
            "first, -1 = any size); got 4 item(s) of shape []; send one item as [item]"
        )
