"""slimtorch: make deep-learning models fit and run fast on the GPU you actually have.

Importing this package is cheap: no server, CLI or plotting libraries are imported and no
CUDA context is created (a test enforces it). Subpackages are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = {
    "core",
    "data",
    "models",
    "train",
    "decompose",
    "prune",
    "distill",
    "quant",
    "sparse",
    "pipeline",
    "serve",
    "cli",
}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"slimtorch.{name}")
    raise AttributeError(f"module 'slimtorch' has no attribute {name!r}")
