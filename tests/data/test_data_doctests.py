"""The docstring examples of slimtorch.data run and print what they claim."""

from __future__ import annotations

import pkgutil

import pytest

import slimtorch.data as data
from doctest_helpers import docstring_example_problems

MODULES = [
    "slimtorch.data",
    *sorted(m.name for m in pkgutil.iter_modules(data.__path__, prefix="slimtorch.data.")),
]
# Their examples load the real Fashion-MNIST/MNIST files from $SLIMTORCH_DATA (with
# download=False, so an example never reaches the network).
REAL_DATA = {"slimtorch.data", "slimtorch.data.resolve"}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(
    name: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    if name in REAL_DATA:
        monkeypatch.setenv("SLIMTORCH_DATA", str(request.getfixturevalue("shared_data")))
    assert not docstring_example_problems(name, data)
