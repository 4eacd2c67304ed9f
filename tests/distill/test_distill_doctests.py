"""The docstring examples of slimtorch.distill run and print what they claim."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

import slimtorch.distill as distill
import slimtorch.train as train
from doctest_helpers import check_docstring_examples

MODULES = [
    "slimtorch.distill",
    "slimtorch.distill.callback",
    "slimtorch.distill.config",
    "slimtorch.distill.losses",
    "slimtorch.distill.teacher",
]


@pytest.fixture(autouse=True)
def _temp_dirs_under_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The examples' ``tempfile.mkdtemp()`` folders go under pytest's tmp_path (cleaned up)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    check_docstring_examples(name, distill, train)
