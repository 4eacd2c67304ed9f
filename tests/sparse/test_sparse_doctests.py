"""The docstring examples of slimtorch.sparse run and print what they claim."""

from __future__ import annotations

import pytest

import slimtorch.prune as prune
import slimtorch.sparse as sparse
from doctest_helpers import docstring_example_problems

_NAMES = (
    "_select",
    "config",
    "distribution",
    "updates",
    "dst",
    "make",
    "formats",
    "packed",
    "kernels",
    "report",
    "sparsify",
)


@pytest.mark.parametrize("name", [*(f"slimtorch.sparse.{m}" for m in _NAMES), "slimtorch.sparse"])
def test_docstring_examples(name: str) -> None:
    assert not docstring_example_problems(name, prune, sparse)


def test_import_does_not_pull_heavy_modules() -> None:
    import subprocess
    import sys

    code = (
        "import sys, slimtorch.sparse; "
        "bad = [m for m in ('fastapi', 'uvicorn', 'onnxruntime', 'onnx', 'torchao') "
        "if m in sys.modules]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
