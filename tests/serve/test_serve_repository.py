"""The repository scan: a broken model folder is reported as not ready, never stops the scan."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from serve_helpers import make_mlp, save_slimtorch, write_config
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
