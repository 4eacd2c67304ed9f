"""``slimtorch serve`` options map onto the settings; the CLI module stays light."""

from __future__ import annotations

import argparse

import pytest

from slimtorch.cli import serve_cmd


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="slimtorch")
    sub = parser.add_subparsers(dest="command")
    serve_cmd.add_parser(sub)
    return parser.parse_args(["serve", *argv])


def test_options_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLIMTORCH_SERVE_PORT", "9100")
    monkeypatch.setenv("SLIMTORCH_SERVE_MAX_BATCH_SIZE", "8")
    args = _parse(
        [
            "--repository",
            "models",
            "--host",
            "0.0.0.0",
            "--pin",
            "a,b",
            "--memory-budget",
            "1000000",
            "--no-access-log",
            "--load-policy",
            "startup",
        ]
    )
    assert args.handler is serve_cmd.run
    s = serve_cmd.settings_from_args(args)
    assert (s.repository, s.host, s.port, s.pinned) == ("models", "0.0.0.0", 9100, ("a", "b"))
    assert (s.memory_budget_bytes, s.access_log, s.load_policy, s.max_batch_size) == (
        1_000_000,
        False,
        "startup",
        8,
    )
    defaults = serve_cmd.settings_from_args(_parse([]))
    assert defaults.repository is None and defaults.runs_dir == "runs"


def test_bad_option_raises_value_error() -> None:
    with pytest.raises(ValueError, match=r"ServeSettings\.port"):
        serve_cmd.settings_from_args(_parse(["--port", "-1"]))
    with pytest.raises(SystemExit):
        _parse(["--load-policy", "lazy"])
