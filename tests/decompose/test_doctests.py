"""The docstring examples of slimtorch.decompose run and print what they claim."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import torch
from torch import nn

import slimtorch.decompose as dec

_PACKAGES = pkgutil.walk_packages(dec.__path__, prefix="slimtorch.decompose.")
MODULES = [*sorted(m.name for m in _PACKAGES), "slimtorch.decompose"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    extra = {"torch": torch, "nn": nn, **{n: getattr(dec, n) for n in dec.__all__}}
    result = doctest.testmod(module, extraglobs=extra, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
