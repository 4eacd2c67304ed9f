"""The docstring examples of slimtorch.decompose run and print what they claim."""

from __future__ import annotations

import pkgutil

import pytest

import slimtorch.decompose as dec
from doctest_helpers import docstring_example_problems

_PACKAGES = pkgutil.walk_packages(dec.__path__, prefix="slimtorch.decompose.")
MODULES = [*sorted(m.name for m in _PACKAGES), "slimtorch.decompose"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    assert not docstring_example_problems(
        name, dec, require_example=False
    )  # package __init__s may have none
