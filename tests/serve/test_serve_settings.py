"""Settings from the environment and model configs: parsing and error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve_helpers import KEY, ONNX_B, ONNX_W, app_client, write_config, write_onnx
from slimtorch.serve.model_config import parse_model_config
from slimtorch.serve.settings import ServeSettings


def test_settings_from_environment() -> None:
    env = {
        "SLIMTORCH_SERVE_PORT": "9001",
        "SLIMTORCH_SERVE_MEMORY_BUDGET_BYTES": "1_000_000",
        "SLIMTORCH_SERVE_ACCESS_LOG": "off",
        "SLIMTORCH_SERVE_PINNED": "a, b",
        "SLIMTORCH_SERVE_API_KEY": "",
        "SLIMTORCH_SERVE_REQUEST_TIMEOUT_S": "2.5",
    }
    s = ServeSettings.from_env(env, host="0.0.0.0")
    assert (s.port, s.memory_budget_bytes, s.access_log, s.pinned) == (
        9001,
        10**6,
        False,
        ("a", "b"),
    )
    assert s.api_key is None and s.request_timeout_s == 2.5 and s.host == "0.0.0.0"
    assert ServeSettings.from_env({}).host == "127.0.0.1"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SLIMTORCH_SERVE_PORT": "eighty"}, "SLIMTORCH_SERVE_PORT='eighty': expected an integer"),
        ({"SLIMTORCH_SERVE_PORT": "70000"}, "ServeSettings.port must be in [0, 65535]"),
        ({"SLIMTORCH_SERVE_LOAD_POLICY": "lazy"}, "'on_demand', 'startup'"),
        ({"SLIMTORCH_SERVE_ACCESS_LOG": "maybe"}, "expected a boolean"),
        ({"SLIMTORCH_SERVE_API_KEY": "short"}, "at least 8 characters"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ServeSettings.from_env(env)


def test_pinned_as_a_plain_string_is_refused() -> None:
    # ServeSettings(pinned="demo") pinned the models "d", "e", "m" and "o"
    with pytest.raises(ValueError, match=r"pinned must be a tuple of model names.*\('demo',\)"):
        ServeSettings(pinned="demo")  # type: ignore[arg-type]
    assert ServeSettings(pinned=["demo"]).pinned == ("demo",)  # type: ignore[arg-type]


def test_model_config_defaults_and_errors() -> None:
    s = ServeSettings(max_batch_size=8, max_queue_delay_ms=1.0)
    base = {
        "format": "onnx",
        "inputs": [{"name": "x", "dims": [4]}],
        "outputs": [{"name": "y", "dims": [2]}],
    }
    cfg = parse_model_config(base, name="m", settings=s)
    assert cfg.max_batch_size == 8 and cfg.inputs[0].datatype == "FP32"
    assert cfg.inputs[0].metadata() == {"name": "x", "datatype": "FP32", "shape": [-1, 4]}
    for bad, msg in (
        ({**base, "max_batch_size": 0}, "max_batch_size must be in"),
        ({**base, "typo": 1}, "unknown config key"),
        ({**base, "inputs": [{"name": "x", "dims": [0]}]}, "inputs[0]"),
        ({**base, "inputs": [{"name": "x", "datatype": "FP8"}]}, "datatype"),
        ({**base, "name": "other"}, "folder name"),
        ({"inputs": base["inputs"], "outputs": base["outputs"]}, "lacks 'format'"),
        ({**base, "versions": [-1]}, "versions"),
    ):
        with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            parse_model_config(bad, name="m", settings=s)


@pytest.mark.parametrize("value", ["false", 0, 1, None])
def test_allow_nan_that_is_not_a_bool_is_refused_naming_file_and_field(
    tmp_path: Path, value: object
) -> None:
    # "allow_nan": "false" (a string) turned NaN acceptance on
    write_onnx(tmp_path / "m" / "1" / "model.onnx", ONNX_W, ONNX_B)
    inputs = [{"name": "x", "datatype": "FP32", "dims": [4], "allow_nan": value}]
    write_config(tmp_path / "m", format="onnx", inputs=inputs, outputs=[{"name": "y", "dims": [3]}])
    with app_client(tmp_path, api_key=KEY) as c:
        r = c.get("/v2/models/m/ready")
        assert r.status_code == 503, r.text
        reason = r.json()["reason"]
        assert reason.startswith("m/config.json: inputs[0]: allow_nan must be true or false")
        assert repr(value) in reason


def test_python_m_slimtorch_serve_reports_a_bad_option_like_the_command(capsys, tmp_path) -> None:
    from slimtorch.serve.__main__ import main

    assert main(["--repository", str(tmp_path), "--api-key", "k1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slimtorch serve: error: ServeSettings.api_key must be at least 8")
