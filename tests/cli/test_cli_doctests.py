"""The docstring examples of slimtorch.cli run and print what they claim."""

from __future__ import annotations

import pytest

from doctest_helpers import docstring_example_problems

MODULES = ["slimtorch.cli.common", "slimtorch.cli.compress_cmd", "slimtorch.cli.export_cmd"]
# The sub-commands show shell command lines, not Python examples; slimtorch.cli.__main__ is
# left out because importing it runs the command line.
NO_EXAMPLE = [
    "slimtorch.cli",
    "slimtorch.cli.devices_cmd",
    "slimtorch.cli.eval_cmd",
    "slimtorch.cli.main",
    "slimtorch.cli.profile_cmd",
    "slimtorch.cli.serve_cmd",
    "slimtorch.cli.train_cmd",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    assert not docstring_example_problems(name)


@pytest.mark.parametrize("name", NO_EXAMPLE)
def test_modules_without_examples(name: str) -> None:
    assert not docstring_example_problems(name, require_example=False)
