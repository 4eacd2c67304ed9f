"""scripts/constraints.py: keep the installed torch when new enough, refuse an older one."""

from __future__ import annotations

import importlib.metadata

import pytest

from script_helpers import load_script


def _run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], version: str | None
) -> str:
    script = load_script("constraints")

    def installed(name: str) -> str:
        if version is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return version

    monkeypatch.setattr(script.importlib.metadata, "version", installed)
    script.main()
    return capsys.readouterr().out


def test_the_floor_is_pyprojects_and_an_installed_build_above_it_is_kept(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    script = load_script("constraints")
    floor = script.torch_floor()
    assert floor >= (2, 7)  # torch.export.Dim.DYNAMIC and dynamo's recompile_limit
    kept = f"{floor[0]}.{floor[1]}.1+rocm6.2"
    assert _run(monkeypatch, capsys, kept).splitlines() == [f"torch=={kept}"]
    assert "torch==2.13.0" in _run(monkeypatch, capsys, None)  # a fresh venv: the CPU pin


def test_an_older_installed_torch_stops_make_instead_of_being_replaced(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit, match=r"torch 2\.4\.1\+rocm6\.1 is installed here; .* >= 2\.7"):
        _run(monkeypatch, capsys, "2.4.1+rocm6.1")
