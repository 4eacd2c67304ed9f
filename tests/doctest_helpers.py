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


def check_docstring_examples(
    name: str,
    *namespaces: ModuleType,
    extra: dict[str, Any] | None = None,
    must_run: bool = True,
) -> None:
    """Run the examples of module ``name``; every one must pass (and one must run if ``must_run``).

    ``torch``, ``nn`` and the public names (``__all__``) of each of ``namespaces`` are in scope,
    as they are for a reader of the package's documentation. The examples' ``tempfile.mkdtemp()``
    folders go into one temporary directory, removed afterwards.
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
            result = doctest.testmod(module, extraglobs=globs, optionflags=doctest.ELLIPSIS)
        finally:
            tempfile.tempdir = before
    assert result.attempted > 0 or not must_run, f"{name} has no docstring example that runs"
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
