"""Fixed-width text tables for transform reports (``to_table`` of every report)."""

from __future__ import annotations

from collections.abc import Sequence


def text_table(lines: Sequence[Sequence[str]]) -> str:
    """Rows of cells, every column but the last padded to its widest cell, joined by two spaces.

    The last column (a free-text reason in the reports) is left unpadded so that one long
    reason does not widen the table; trailing spaces are stripped from every line.

    Example:
        >>> text_table([("layer", "action", "reason"), ("fc", "skipped", "too small")]).splitlines()
        ['layer  action   reason', 'fc     skipped  too small']
    """
    if not lines:
        return ""
    n = len(lines[0])
    if any(len(line) != n for line in lines):
        raise ValueError(
            f"every row needs {n} cells, got rows of {sorted({len(x) for x in lines})}"
        )
    widths = [max(len(line[i]) for line in lines) for i in range(n - 1)]
    return "\n".join(
        "  ".join(
            [*(c.ljust(w) for c, w in zip(line[:-1], widths, strict=True)), line[-1]]
        ).rstrip()
        for line in lines
    )
