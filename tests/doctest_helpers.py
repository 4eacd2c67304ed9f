"""One way to run a module's docstring examples as a test."""

from __future__ import annotations

import doctest
import getpass
import importlib
import os
import tempfile
from types import ModuleType
from typing import Any

import torch
from torch import nn

# torch.compile's cache goes under tempfile.gettempdir() unless told otherwise; pin it before the
# examples' temporary directory is swapped in, or it would be created in (and outlive) that one.
try:
    _USER = getpass.getuser()
except (KeyError, OSError):  # a uid with no passwd entry, no USER variable
    _USER = "user"
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"torchinductor_{_USER}")
)


def run_docstring_examples(
    name: str, *namespaces: ModuleType, extra: dict[str, Any] | None = None
) -> doctest.TestResults:
    """Run the examples of module ``name``; return doctest's ``(failed, attempted)`` counts.

    ``torch``, ``nn`` and the public names (``__all__``) of each of ``namespaces`` are in scope,
    as they are for a reader of the package's documentation. The examples' ``tempfile.mkdtemp()``
    folders go into one temporary directory, removed afterwards. Failures are printed by doctest
    (pytest shows them with the failing test).
    """
    module = importlib.import_module(name)
    globs: dict[str, Any] = {"torch": torch, "nn": nn}
    for ns in namespaces:
        globs.update({n: getattr(ns, n) for n in ns.__all__})
    globs.update(extra or {})
    before = tempfile.tempdir
    with tempfile.TemporaryDirectory(prefix="slimtorch-doctest-") as scratch:
        tempfile.tempdir = scratch
        try:
            return doctest.testmod(module, extraglobs=globs, optionflags=doctest.ELLIPSIS)
        finally:
            tempfile.tempdir = before


def docstring_example_problems(
    name: str,
    *namespaces: ModuleType,
    extra: dict[str, Any] | None = None,
    require_example: bool = True,
) -> list[str]:
    """What is wrong with module ``name``'s examples (see :func:`run_docstring_examples`): failed
    examples and, with ``require_example``, having none that runs. Empty when all is well, so a
    test reads ``assert not docstring_example_problems(...)``."""
    failed, attempted = run_docstring_examples(name, *namespaces, extra=extra)
    problems = [f"{failed} docstring example(s) failed in {name}"] if failed else []
    if require_example and attempted == 0:
        problems.append(f"{name} has no docstring example that runs")
    return problems
