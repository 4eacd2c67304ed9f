"""The docstring examples of slimtorch.distill run and print what they claim."""

from __future__ import annotations

import pytest

import slimtorch.distill as distill
import slimtorch.train as train
from doctest_helpers import docstring_example_problems

MODULES = [
    "slimtorch.distill",
    "slimtorch.distill.callback",
    "slimtorch.distill.config",
    "slimtorch.distill.losses",
    "slimtorch.distill.teacher",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    assert not docstring_example_problems(name, distill, train)
