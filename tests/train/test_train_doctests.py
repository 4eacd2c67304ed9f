"""The docstring examples of slimtorch.train run and print what they claim."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

import slimtorch.train as train
from doctest_helpers import docstring_example_problems

MODULES = [
    "slimtorch.train",
    "slimtorch.train.amp",
    "slimtorch.train.batchnorm",
    "slimtorch.train.callbacks",
    "slimtorch.train.checkpoint",
    "slimtorch.train.classifier",
    "slimtorch.train.config",
    "slimtorch.train.distributed",
    "slimtorch.train.history",
    "slimtorch.train.loader",
    "slimtorch.train.meter",
    "slimtorch.train.optim",
    "slimtorch.train.progress",
    "slimtorch.train.seeding",
    "slimtorch.train.trainer",
    "slimtorch.train.trainer_state",
]


@pytest.fixture(autouse=True)
def _restore_determinism() -> Iterator[None]:
    """seed_everything(..., deterministic=True) in the examples changes process-wide settings."""
    algorithms = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    yield
    torch.use_deterministic_algorithms(algorithms, warn_only=warn_only)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
    if cublas is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    assert not docstring_example_problems(name, train)
