"""The docstring examples of slimtorch.prune run and print what they claim."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch
from torch import nn

import slimtorch.prune as prune

_NAMES = ("masks", "buffers", "report", "magnitude", "callbacks", "storage")
MODULES = [f"slimtorch.prune.{m}" for m in _NAMES]


@pytest.mark.parametrize("name", [*MODULES, "slimtorch.prune"])
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    extra = {"torch": torch, "nn": nn, **{n: getattr(prune, n) for n in prune.__all__}}
    result = doctest.testmod(module, extraglobs=extra, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
