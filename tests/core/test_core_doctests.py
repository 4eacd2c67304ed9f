"""The docstring examples of slimtorch.core (measure included) run and print what they claim."""

from __future__ import annotations

import pkgutil

import pytest

import slimtorch.core as core
import slimtorch.core.measure as measure
from doctest_helpers import docstring_example_problems

_PACKAGES = pkgutil.walk_packages(core.__path__, prefix="slimtorch.core.")
MODULES = sorted(m.name for m in _PACKAGES)

# Modules with nothing to show: the empty package __init__ and the exception classes.
NO_EXAMPLES = {"slimtorch.core", "slimtorch.core.errors"}


def test_every_core_module_is_covered() -> None:
    assert "slimtorch.core.measure.profile" in MODULES
    assert "slimtorch.core.profiles" in MODULES


@pytest.mark.parametrize("name", ["slimtorch.core", *MODULES])
def test_docstring_examples(name: str) -> None:
    # profiles.register_profile's example registers a "toy-gpu" profile for the process.
    assert not docstring_example_problems(name, measure, require_example=name not in NO_EXAMPLES)
