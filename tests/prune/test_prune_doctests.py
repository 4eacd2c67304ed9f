"""The docstring examples of slimtorch.prune run and print what they claim."""

from __future__ import annotations

import pytest

import slimtorch.prune as prune
from doctest_helpers import docstring_example_problems

_NAMES = ("masks", "buffers", "report", "magnitude", "callbacks", "storage")
MODULES = [f"slimtorch.prune.{m}" for m in _NAMES]


@pytest.mark.parametrize("name", [*MODULES, "slimtorch.prune"])
def test_docstring_examples(name: str) -> None:
    assert not docstring_example_problems(name, prune)
