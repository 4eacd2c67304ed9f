"""The docstring examples of slimtorch.serve run and print what they claim."""

from __future__ import annotations

import pytest

import slimtorch.serve as serve
from doctest_helpers import docstring_example_problems

# Examples that need a model write a small one into a temporary folder; starting a listening
# server (app.py's uvicorn.run, run.py) is skipped. protocol.schemas is in test_quant_doctests.
MODULES = [
    "slimtorch.serve",
    "slimtorch.serve.app",
    "slimtorch.serve.batcher",
    "slimtorch.serve.cache",
    "slimtorch.serve.errors",
    "slimtorch.serve.infer",
    "slimtorch.serve.logs",
    "slimtorch.serve.metrics",
    "slimtorch.serve.middleware",
    "slimtorch.serve.model_config",
    "slimtorch.serve.onnx_graph",
    "slimtorch.serve.protocol.codec",
    "slimtorch.serve.repository",
    "slimtorch.serve.runners",
    "slimtorch.serve.server",
    "slimtorch.serve.settings",
]
# No example that runs: none written, or only one that starts a server (run.py).
NO_EXAMPLE = [
    "slimtorch.serve.__main__",
    "slimtorch.serve.deps",
    "slimtorch.serve.protocol",
    "slimtorch.serve.routes",
    "slimtorch.serve.run",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    assert not docstring_example_problems(name, serve)


@pytest.mark.parametrize("name", NO_EXAMPLE)
def test_modules_without_runnable_examples(name: str) -> None:
    assert not docstring_example_problems(name, serve, require_example=False)
