"""The docstring examples of slimtorch.quant (and a few small, self-contained modules of other
packages) run and print what they claim."""

from __future__ import annotations

import pkgutil

import pytest

import slimtorch.quant as quant
from doctest_helpers import docstring_example_problems

QUANT_MODULES = [
    "slimtorch.quant",
    *sorted(m.name for m in pkgutil.iter_modules(quant.__path__, prefix="slimtorch.quant.")),
]

# Small, self-contained modules of other packages, checked here as well.
OTHER_MODULES = ["slimtorch.core.globs", "slimtorch.serve.protocol.schemas"]


def test_every_quant_module_is_covered() -> None:
    for name in ("qfunc", "int4", "export", "runtime", "qat_convert"):
        assert f"slimtorch.quant.{name}" in QUANT_MODULES


@pytest.mark.parametrize("name", QUANT_MODULES)
def test_quant_docstring_examples(name: str) -> None:
    assert not docstring_example_problems(name, quant)


@pytest.mark.parametrize("name", OTHER_MODULES)
def test_docstring_examples(name: str) -> None:
    assert not docstring_example_problems(name)
