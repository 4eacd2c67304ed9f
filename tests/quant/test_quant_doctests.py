"""The docstring examples of small, self-contained modules run and print what they claim."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch
from torch import nn


@pytest.mark.parametrize(
    "name",
    [
        "slimtorch.quant.qfunc",
        "slimtorch.quant.int4",
        "slimtorch.core.globs",
        "slimtorch.serve.protocol.schemas",
    ],
)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, extraglobs={"torch": torch, "nn": nn})
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
