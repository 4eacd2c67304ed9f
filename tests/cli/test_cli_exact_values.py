"""Exact outcomes of the CLI's output checks: what --overwrite replaces, foreign files beside a
model, an empty --input-shape dimension and a folder the user cannot write to."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from slimtorch.cli import common
from slimtorch.cli.common import check_output_path, check_run_output, parse_shape
from slimtorch.cli.main import main


def test_overwrite_returns_the_run_files_it_will_replace(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(model_dir, out / "model")
    (out / "report.json").write_text("{}")
    replaced = check_run_output(str(out), overwrite=True)
    assert {p.name for p in replaced} == {"report.json"}


def test_a_foreign_file_in_the_model_directory_is_refused(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(model_dir, out / "model")
    (out / "model" / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match=re.escape("mine.txt besides the model")):
        check_run_output(str(out), overwrite=True)


def test_an_input_shape_with_a_zero_dimension_is_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(ValueError, match="three positive integers C,H,W, got '0,28,28'"):
        parse_shape("0,28,28")
    base = ["profile", "--device", "cpu", "--profiles", "rx580", "--model", "mlp"]
    assert main([*base, "--input-shape", "0,28,28"]) == 2
    assert "three positive integers" in capsys.readouterr().err


def test_a_folder_the_user_cannot_write_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.access

    def access(path: object, mode: int) -> bool:
        # the folder is read-only for this test whatever the uid (root may write anywhere)
        return False if Path(str(path)) == tmp_path else real(path, mode)  # type: ignore[arg-type]

    monkeypatch.setattr(common.os, "access", access)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path} is not writable here")):
        check_output_path(str(tmp_path / "x.onnx"), "--out", folder=False)
