"""torch.export programs (model.pt2): a config read from the archive's program, an explicit
config checked against it at the scan, and archives it cannot read."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from serve_helpers import app_client, make_mlp, reference, write_config
from slimtorch.core.errors import ModelLoadError
from slimtorch.models import save_exported
from slimtorch.serve import ServeSettings
from slimtorch.serve.model_config import parse_model_config
from slimtorch.serve.pt2_graph import (
    SCALAR_TYPES,
    check_pt2_config,
    derive_pt2_config,
    read_pt2_signature,
)


def _digits(n: int) -> np.ndarray:
    return np.random.default_rng(2).standard_normal((n, 1, 8, 8), dtype=np.float32)


def _infer(c: TestClient, model: str, name: str, x: np.ndarray) -> dict[str, object]:
    body = {"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32",
                        "data": x.ravel().tolist()}]}  # fmt: skip
    r = c.post(f"/v2/models/{model}/infer", json=body)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_scalar_types_follow_torch_serialization() -> None:
    from torch._export.serde.schema import ScalarType

    from slimtorch.serve.onnx_graph import ELEM_TYPES

    expected = {
        "BYTE": "UINT8", "CHAR": "INT8", "SHORT": "INT16", "INT": "INT32", "LONG": "INT64",
        "HALF": "FP16", "FLOAT": "FP32", "DOUBLE": "FP64", "BOOL": "BOOL", "BFLOAT16": None,
        "UINT16": "UINT16", "UINT32": "UINT32", "UINT64": "UINT64",
    }  # fmt: skip
    known = {e.name: e.value for e in ScalarType}  # older torch lacks the unsigned ones
    assert {"FLOAT", "HALF", "LONG"} <= set(known)
    for name, datatype in expected.items():
        if name not in known:
            continue
        elem = SCALAR_TYPES[known[name]]
        assert ELEM_TYPES[elem][1] == datatype, name


def test_a_program_without_config_serves_with_names_from_the_archive(
    tmp_path: Path, digits_model: dict[str, Path]
) -> None:
    (tmp_path / "r20-pt2" / "1").mkdir(parents=True)
    shutil.copy(digits_model["pt2"], tmp_path / "r20-pt2" / "1" / "model.pt2")
    x = _digits(3)
    with app_client(tmp_path) as c:
        assert c.get("/v2/models/r20-pt2/ready").status_code == 200
        meta = c.get("/v2/models/r20-pt2").json()
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
        assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}]
        out = _infer(c, "r20-pt2", "x", x)["outputs"][0]  # type: ignore[index]
        assert out["name"] == "output"  # type: ignore[index]
        got = np.array(out["data"], np.float32).reshape(3, 10)  # type: ignore[index]
        torch.testing.assert_close(got, reference(digits_model["dir"], x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (
            {"outputs": [{"name": "a", "dims": [10]}, {"name": "b", "dims": [10]}]},
            "has 1 outputs but the model config lists 2 (['a', 'b']); a .pt2 takes and returns "
            "its tensors in order",
        ),
        (
            {"inputs": [{"name": "input", "dims": [1, 28, 28]}]},
            "input 'input' of {path} has shape ['?', 1, 8, 8] (batch first) but the model config "
            "says [-1, 1, 28, 28]",
        ),
        (
            {"inputs": [{"name": "input", "datatype": "INT64", "dims": [1, 8, 8]}]},
            "input 'input' of {path} is FLOAT (FP32) but the model config says INT64",
        ),
    ],
)
def test_an_explicit_config_is_checked_against_the_program(
    tmp_path: Path, digits_model: dict[str, Path], change: dict[str, object], reason: str
) -> None:
    config = {
        "format": "torch_export",
        "inputs": [{"name": "input", "dims": [1, 8, 8]}],  # any names: tensors go in order
        "outputs": [{"name": "logits", "dims": [10]}],
    }
    write_config(tmp_path / "ok", **config)
    write_config(tmp_path / "bad", **{**config, **change})
    for name in ("ok", "bad"):
        (tmp_path / name / "1").mkdir()
        shutil.copy(digits_model["pt2"], tmp_path / name / "1" / "model.pt2")
    reason = reason.replace("{path}", "bad/1/model.pt2")  # relative: clients see no server paths
    with app_client(tmp_path) as c:
        assert c.get("/v2/models/ok/ready").status_code == 200
        _infer(c, "ok", "input", _digits(2))
        r = c.get("/v2/models/bad/ready")
        assert r.status_code == 503 and reason in r.json()["reason"], r.text


def test_a_fixed_batch_program_needs_a_config(tmp_path: Path) -> None:
    path = tmp_path / "model.pt2"
    save_exported(make_mlp(0), torch.randn(1, 1, 8, 8), path, dynamic_batch=False)
    with pytest.raises(ModelLoadError, match="input 'x' has a fixed first dimension 1") as info:
        derive_pt2_config(path)
    assert '{"format": "torch_export", "inputs": [' in str(info.value)
    config = parse_model_config(
        {"format": "torch_export", "max_batch_size": 1,
         "inputs": [{"name": "input", "dims": [1, 8, 8]}],
         "outputs": [{"name": "logits", "dims": [10]}]},
        name="m",
        settings=ServeSettings(),
    )  # fmt: skip
    check_pt2_config(path, config)  # batch 1 is what it serves


def _rewrite_program(src: Path, dst: Path, edit: object) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename.endswith("/models/model.json"):
                data = json.dumps(edit(json.loads(data))).encode()  # type: ignore[operator]
            zout.writestr(item, data)


def test_archives_it_cannot_read(tmp_path: Path, digits_model: dict[str, Path]) -> None:
    not_zip = tmp_path / "junk.pt2"
    not_zip.write_bytes(b"not an archive")
    with pytest.raises(ModelLoadError, match=r"is not a readable torch\.export archive"):
        read_pt2_signature(not_zip)
    # a program laid out differently (another torch version): no derived config, and an
    # explicit config is taken as it is
    other = tmp_path / "other.pt2"
    _rewrite_program(digits_model["pt2"], other, lambda d: {**d, "graph_module": {}})
    with pytest.raises(ModelLoadError, match="a layout this version does not know") as info:
        derive_pt2_config(other)
    assert "write config.json" in str(info.value)
    config = parse_model_config(
        {"format": "torch_export", "inputs": [{"name": "input", "dims": [3, 3, 3]}],
         "outputs": [{"name": "logits", "dims": [10]}]},
        name="m",
        settings=ServeSettings(),
    )  # fmt: skip
    check_pt2_config(other, config)  # nothing to check against: the config stands
    with pytest.raises(ModelLoadError, match=r"has shape \['\?', 1, 8, 8\]"):
        check_pt2_config(digits_model["pt2"], config)


def test_a_program_with_half_layers_behind_a_float_input_serves(tmp_path: Path) -> None:
    """A mixed-precision model (float32 input, some float16 layers) exported: the inputs go
    in as the program takes them, not in its parameters' dtype."""
    from torch import nn

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(16, 10).half()  # its parameters come first
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x).half()).float()

    torch.manual_seed(0)
    model = Mixed().eval()
    save_exported(model, torch.randn(2, 1, 8, 8), tmp_path / "mixed" / "1" / "model.pt2")
    x = _digits(3)
    with app_client(tmp_path) as c:
        assert c.get("/v2/models/mixed/ready").status_code == 200
        out = _infer(c, "mixed", "x", x)
    got = np.asarray(out["outputs"][0]["data"], dtype=np.float32).reshape(3, 10)  # type: ignore[index]
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-3)
