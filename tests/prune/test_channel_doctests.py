"""The docstring examples of slimtorch.prune.channel run and print what they claim."""

from __future__ import annotations

import pytest

import slimtorch.prune.channel as channel
from doctest_helpers import docstring_example_problems

# finetune's examples need trained model directories; its behaviour is tested directly.
_NAMES = (
    "spaces", "walk", "graph", "importance", "config", "report", "layers", "check", "transform",
)  # fmt: skip
MODULES = [f"slimtorch.prune.channel.{m}" for m in _NAMES]


@pytest.mark.parametrize("name", [*MODULES, "slimtorch.prune.channel"])
def test_docstring_examples(name: str) -> None:
    assert not docstring_example_problems(name, channel)
