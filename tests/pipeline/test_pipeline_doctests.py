"""The docstring examples of slimtorch.pipeline run and print what they claim."""

from __future__ import annotations

import pytest

import slimtorch.pipeline as pipeline
from doctest_helpers import docstring_example_problems

# compress.py's module example needs a trained model directory (it is skipped there)
MODULES = [
    "slimtorch.pipeline.compress",
    "slimtorch.pipeline.methods",
    "slimtorch.pipeline.quant_methods",
    "slimtorch.pipeline.report_table",
    "slimtorch.pipeline.verdict",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    assert not docstring_example_problems(name, pipeline)
