"""The docstring examples of slimtorch.prune.channel run and print what they claim."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch
from torch import nn

import slimtorch.prune.channel as channel

# finetune's examples need trained model directories; its behaviour is tested directly.
_NAMES = ("spaces", "walk", "graph", "importance", "config", "report", "layers", "transform")
MODULES = [f"slimtorch.prune.channel.{m}" for m in _NAMES]


@pytest.mark.parametrize("name", [*MODULES, "slimtorch.prune.channel"])
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    extra = {"torch": torch, "nn": nn, **{n: getattr(channel, n) for n in channel.__all__}}
    result = doctest.testmod(module, extraglobs=extra, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
