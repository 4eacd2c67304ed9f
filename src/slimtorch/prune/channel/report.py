"""The report of :func:`~slimtorch.prune.channel.transform.prune_channels_`: one row per group.

Example:
    >>> row = ChannelGroupRow("conv1", ["conv1"], ["conv1", "bn1"], 16, 8, "l1", "pruned")
    >>> report = ChannelPruneReport({"ratio": 0.5}, [row], 100, 60, 1000, 500)
    >>> report.to_dict()["totals"]["params_ratio"]
    0.6
"""

from __future__ import annotations

import dataclasses
from typing import Any

from slimtorch.core.table import text_table

ACTIONS = ("pruned", "unchanged", "fixed", "skipped")
"""Row actions: ``pruned`` (fewer channels), ``unchanged`` (nothing to remove after rounding
or at ratio 0), ``fixed`` (model input/output channels, never pruned, not an error),
``skipped`` (the graph could not resolve the group or it was excluded; ``strict`` raises)."""


@dataclasses.dataclass
class ChannelGroupRow:
    """One channel group: its layers, channel counts, importance used, action and reason."""

    name: str
    producers: list[str]
    members: list[str]
    channels_before: int
    channels_after: int
    importance: str | None
    action: str
    reason: str | None = None
    ratio: float | None = None


@dataclasses.dataclass
class ChannelPruneReport:
    """Rows for every targeted group, model totals before/after and the recorded entry.

    FLOPs are matmul FLOPs (2 per MAC) of one forward pass on the example input, from
    :func:`slimtorch.core.measure.count_flops`; parameters from ``count_params``.
    """

    config: dict[str, Any]
    rows: list[ChannelGroupRow]
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    entry: dict[str, Any] | None = None

    @property
    def pruned(self) -> list[ChannelGroupRow]:
        """Rows with ``action == "pruned"``."""
        return [r for r in self.rows if r.action == "pruned"]

    @property
    def skipped(self) -> list[ChannelGroupRow]:
        """Rows with ``action == "skipped"``."""
        return [r for r in self.rows if r.action == "skipped"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: config, per-group rows, totals (with ratios) and the entry."""

        def ratio(after: int, before: int) -> float | None:
            return after / before if before else None

        return {
            "method": "channel",
            "config": self.config,
            "groups": [dataclasses.asdict(r) for r in self.rows],
            "totals": {
                "params_before": self.params_before,
                "params_after": self.params_after,
                "params_ratio": ratio(self.params_after, self.params_before),
                "flops_before": self.flops_before,
                "flops_after": self.flops_after,
                "flops_ratio": ratio(self.flops_after, self.flops_before),
                **{a: sum(r.action == a for r in self.rows) for a in ACTIONS},
            },
            "entry": self.entry,
        }

    def to_table(self) -> str:
        """A fixed-width text table, one line per group, then the totals."""
        lines: list[tuple[str, ...]] = [
            ("group", "layers", "channels", "importance", "action", "reason")
        ]
        for r in self.rows:
            lines.append(
                (
                    r.name,
                    str(len(r.members)),
                    f"{r.channels_before} -> {r.channels_after}",
                    r.importance or "-",
                    r.action,
                    r.reason or "",
                )
            )
        body = [text_table(lines)]
        body.append(
            f"params {self.params_before:,} -> {self.params_after:,}; "
            f"FLOPs {self.flops_before:,} -> {self.flops_after:,}"
        )
        return "\n".join(body)
