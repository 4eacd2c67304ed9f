"""Report tables: padded columns, a free last column, no trailing spaces."""

from __future__ import annotations

import pytest

from slimtorch.core.table import text_table


def test_columns_pad_but_the_last_one_does_not() -> None:
    text = text_table(
        [
            ("layer", "action", "reason"),
            ("features.0", "pruned", ""),
            ("fc", "skipped", "a long reason"),
        ]
    )
    assert text.splitlines() == [
        "layer       action   reason",
        "features.0  pruned",
        "fc          skipped  a long reason",
    ]


def test_ragged_rows_are_refused_and_empty_is_empty() -> None:
    assert text_table([]) == ""
    with pytest.raises(ValueError, match="every row needs 2 cells"):
        text_table([("a", "b"), ("c",)])
