"""The docstring examples of slimtorch.models run and print what they claim."""

from __future__ import annotations

import pkgutil
from collections.abc import Iterator

import pytest

import slimtorch.models as models
from doctest_helpers import docstring_example_problems
from slimtorch.models import ARCH_TRANSFORMS, MODELS

MODULES = [
    "slimtorch.models",
    *sorted(m.name for m in pkgutil.iter_modules(models.__path__, prefix="slimtorch.models.")),
]


@pytest.fixture
def forget_example_registrations() -> Iterator[None]:
    """Unregister what the examples register (the model "tiny", the transform "demo.fc1_width").

    Only entries defined in an example are removed: a package that an example imports (a
    transform name like "prune.channels" imports slimtorch.prune) keeps its registrations.
    """
    registries = (MODELS, ARCH_TRANSFORMS)
    before = [set(r._items) for r in registries]
    yield
    for registry, keys in zip(registries, before, strict=True):
        for key in set(registry._items) - keys:
            code = getattr(registry._items[key], "__code__", None)
            if code is not None and code.co_filename.startswith("<doctest "):
                del registry._items[key]


@pytest.mark.usefixtures("forget_example_registrations")
@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    assert not docstring_example_problems(name, models)
