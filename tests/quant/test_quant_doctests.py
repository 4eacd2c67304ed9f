"""The docstring examples of small, self-contained modules run and print what they claim."""

from __future__ import annotations

import pytest

from doctest_helpers import check_docstring_examples


@pytest.mark.parametrize(
    "name",
    [
        "slimtorch.quant.qfunc",
        "slimtorch.quant.int4",
        "slimtorch.core.globs",
        "slimtorch.serve.protocol.schemas",
    ],
)
def test_docstring_examples(name: str) -> None:
    check_docstring_examples(name)
