"""What the server tells clients: no server paths, no model list behind a key, no forged logs."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from serve_helpers import KEY, app_client, make_mlp, save_slimtorch
from slimtorch.serve.errors import for_client, printable


def test_reasons_name_files_relative_to_the_repository(tmp_path: Path) -> None:
    save_slimtorch(tmp_path / "good" / "1", make_mlp(1))
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with app_client(tmp_path, api_key=KEY) as c:
        reason = c.get("/v2/models/broken/ready").json()["reason"]
        assert reason.startswith("broken/config.json is not valid JSON"), reason
        assert str(tmp_path) not in reason
        error = c.post("/v2/models/broken/infer", json={"inputs": []}).json()["error"]
        assert "broken/config.json" in error and str(tmp_path) not in error
        index = c.post("/v2/repository/index", headers={"X-API-Key": KEY}).json()
        assert any(str(tmp_path) in m.get("reason", "") for m in index)  # the operator's view


def test_an_unknown_model_lists_the_models_only_without_an_api_key(tmp_path: Path) -> None:
    save_slimtorch(tmp_path / "secret-model" / "1", make_mlp(1))
    with app_client(tmp_path, api_key=KEY) as c:
        error = c.get("/v2/models/nope/ready").json()["error"]
        assert "secret-model" not in error and "repository index" in error
    with app_client(tmp_path) as c:
        assert "secret-model" in c.get("/v2/models/nope/ready").json()["error"]


@pytest.mark.parametrize("fast_path", [True, False])
def test_a_url_cannot_write_a_line_of_its_own_into_the_access_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, fast_path: bool
) -> None:
    save_slimtorch(tmp_path / "m" / "1", make_mlp(1))
    forged = "/v2/models/x%0AINFO%20slimtorch.serve.access:%20POST%20/unload%20200/infer"
    with caplog.at_level(logging.INFO, logger="slimtorch.serve.access"):
        with app_client(tmp_path, fast_path=fast_path) as c:
            assert c.post(forged, json={"inputs": []}).status_code == 404
    lines = [r.getMessage() for r in caplog.records if r.name == "slimtorch.serve.access"]
    assert lines and all("\n" not in line for line in lines), lines
    assert any("x\\nINFO" in line for line in lines), lines


def test_helpers() -> None:
    assert (
        for_client("/a/b/m/config.json: bad; /a/b/n/1", ["/a/b", None]) == "m/config.json: bad; n/1"
    )
    assert printable("a\r\nb\x1b[2J") == "a\\r\\nb\\x1b[2J"
    # a relative root only at a path's start: runs/ in myruns/ belongs to another name
    assert for_client("runs/myruns/model/x and 'runs/y'", ["runs"]) == "myruns/model/x and 'y'"
