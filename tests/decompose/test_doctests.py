"""The docstring examples of slimtorch.decompose run and print what they claim."""

from __future__ import annotations

import pkgutil

import pytest

import slimtorch.decompose as dec
from doctest_helpers import run_docstring_examples

_PACKAGES = pkgutil.walk_packages(dec.__path__, prefix="slimtorch.decompose.")
MODULES = [*sorted(m.name for m in _PACKAGES), "slimtorch.decompose"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    failed, _ = run_docstring_examples(name, dec)  # package __init__s may have none
    assert failed == 0, f"{failed} docstring example(s) failed in {name}"
