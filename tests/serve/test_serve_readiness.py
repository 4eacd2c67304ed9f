"""Readiness is honest: a model known to be broken, too large for the memory budget, or not
loaded under the start-up policy is not ready, with its reason in the 503 body and the log."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serve_helpers import (
    IN8,
    KEY,
    OUT10,
    app_client,
    make_mlp,
    save_slimtorch,
    write_config,
    write_onnx,
)

H = {"X-API-Key": KEY}
W = np.eye(4, 3, dtype=np.float32)
B = np.zeros(3, np.float32)


def _onnx(root: Path, name: str, **config: object) -> None:
    write_config(
        root / name,
        format="onnx",
        inputs=[{"name": "x", "dims": [4]}],
        outputs=[{"name": "y", "dims": [3]}],
        **config,
    )
    write_onnx(root / name / "1" / "model.onnx", W, B)


def _x() -> dict[str, object]:
    return {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


@pytest.mark.parametrize("load_policy", ["startup", "on_demand"])
def test_model_over_the_memory_budget_is_not_ready_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, load_policy: str
) -> None:
    # the config as docs/serve.md used to show it: 50 MB and its own on_demand policy, which
    # wins over --load-policy startup
    _onnx(tmp_path, "big", memory_bytes=50_000_000, load_policy="on_demand")
    _onnx(tmp_path, "small", memory_bytes=1000)
    reason = (
        "needs 50000000 bytes but the memory budget is 3000000; raise --memory-budget "
        "(SLIMTORCH_SERVE_MEMORY_BUDGET_BYTES) or lower the model's memory_bytes or "
        "max_batch_size"
    )
    with (
        caplog.at_level("WARNING", logger="slimtorch.serve"),
        app_client(
            api_key=KEY, root=tmp_path, memory_budget_bytes=3_000_000, load_policy=load_policy
        ) as c,
    ):
        r = c.get("/v2/models/big/ready")
        assert r.status_code == 503
        assert r.json() == {"name": "big", "ready": False, "reason": reason}
        r = c.post("/v2/models/big/infer", json=_x())
        assert r.status_code == 503 and reason in r.json()["error"]
        assert c.get("/v2/models/small/ready").status_code == 200
        assert c.post("/v2/models/small/infer", json=_x()).status_code == 200
    assert f"model big version 1 is not ready: {reason}" in caplog.messages


def _wrong_shape(root: Path) -> None:
    """A model whose config promises 12 outputs where the model gives 10 (fails at load)."""
    write_config(
        root / "wrongshape",
        format="slimtorch",
        inputs=IN8,
        outputs=[{"name": "logits", "dims": [12]}],
    )
    save_slimtorch(root / "wrongshape" / "1", make_mlp(5))


def test_startup_load_failure_is_not_ready_before_any_request(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _wrong_shape(tmp_path)
    with (
        caplog.at_level("WARNING", logger="slimtorch.serve"),
        app_client(tmp_path, api_key=KEY, load_policy="startup") as c,
    ):
        r = c.get("/v2/models/wrongshape/ready")
        assert r.status_code == 503
        assert "output 'logits' of model 'wrongshape' has shape [2, 10]" in r.json()["reason"]
    started = [m for m in caplog.messages if "was not loaded at start-up" in m]
    assert len(started) == 1
    assert started[0].startswith(
        "model wrongshape version 1 was not loaded at start-up and is not ready: output 'logits'"
    )


def test_startup_model_that_does_not_fit_next_to_pinned_ones_is_not_ready(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _onnx(tmp_path, "a", memory_bytes=2000)
    _onnx(tmp_path, "bb", memory_bytes=2000)
    with (
        caplog.at_level("WARNING", logger="slimtorch.serve"),
        app_client(
            api_key=KEY,
            root=tmp_path,
            memory_budget_bytes=3000,
            load_policy="startup",
            pinned=("a",),
        ) as c,
    ):
        assert c.get("/v2/models/a/ready").status_code == 200
        r = c.get("/v2/models/bb/ready")
        assert r.status_code == 503
        reason = r.json()["reason"]
        assert reason.startswith("model 'bb' needs 2000 bytes but only 1000 of the 3000-byte")
        assert reason.endswith("load it through the management API once there is room")
        assert c.post("/v2/models/bb/infer", json=_x()).status_code == 503
        assert any(
            m.startswith("model bb version 1 was not loaded at start-up and is not ready")
            for m in caplog.messages
        )
        # room is made: the management API loads it, and it is ready
        assert c.post("/v2/repository/models/a/unload", headers=H).status_code == 200
        r = c.post("/v2/repository/models/bb/load", headers=H)
        assert r.status_code == 200 and r.json()[0]["state"] == "READY"
        assert c.get("/v2/models/bb/ready").status_code == 200
        assert c.post("/v2/models/bb/infer", json=_x()).status_code == 200


def test_on_demand_model_is_ready_until_a_load_shows_it_broken(tmp_path: Path) -> None:
    _onnx(tmp_path, "good")
    _wrong_shape(tmp_path)
    save_slimtorch(tmp_path / "plain" / "1", make_mlp(6))
    with app_client(tmp_path, api_key=KEY) as c:
        for name in ("good", "wrongshape", "plain"):  # validated, loaded on demand
            assert c.get(f"/v2/models/{name}/ready").status_code == 200
        index = c.post("/v2/repository/index", headers=H).json()
        assert {row["state"] for row in index} == {"AVAILABLE"}
        x = {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}
        r = c.post("/v2/models/wrongshape/infer", json={"inputs": [x]})
        assert r.status_code == 503 and "[-1, 12]" in r.json()["error"]
        assert c.get("/v2/models/wrongshape/ready").status_code == 503
        # the management API tries it again: the same failure, still not ready
        r = c.post("/v2/repository/models/wrongshape/load", headers=H)
        assert r.status_code == 503 and "[-1, 12]" in r.json()["error"]
        assert c.get("/v2/models/wrongshape/ready").status_code == 503
        assert c.post("/v2/models/plain/infer", json={"inputs": [x]}).status_code == 200


def test_management_load_rechecks_the_files_of_a_broken_version(tmp_path: Path) -> None:
    write_config(tmp_path / "m", format="slimtorch", inputs=IN8, outputs=OUT10)
    save_slimtorch(tmp_path / "m" / "1", make_mlp(1))
    (tmp_path / "m" / "1" / "model.safetensors").write_bytes(b"\x00garbage")
    with app_client(tmp_path, api_key=KEY) as c:
        r = c.post("/v2/repository/models/m/load", headers=H)
        assert r.status_code == 503 and "is corrupt or truncated" in r.json()["error"]
        assert "is corrupt or truncated" in c.get("/v2/models/m/ready").json()["reason"]
