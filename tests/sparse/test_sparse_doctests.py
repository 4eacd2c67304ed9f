"""The docstring examples of slimtorch.sparse run and print what they claim."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch
from torch import nn

import slimtorch.prune as prune
import slimtorch.sparse as sparse

_NAMES = (
    "_select",
    "config",
    "distribution",
    "updates",
    "dst",
    "formats",
    "kernels",
    "report",
    "sparsify",
)


@pytest.mark.parametrize("name", [*(f"slimtorch.sparse.{m}" for m in _NAMES), "slimtorch.sparse"])
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    extra = {
        "torch": torch,
        "nn": nn,
        **{n: getattr(prune, n) for n in prune.__all__},
        **{n: getattr(sparse, n) for n in sparse.__all__},
    }
    result = doctest.testmod(module, extraglobs=extra, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


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
