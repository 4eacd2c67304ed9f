"""The per-layer report of :func:`~slimtorch.prune.magnitude.prune_`.

Example:
    >>> net = nn.Sequential(nn.Linear(8, 8))
    >>> report = prune_(net, MagnitudeConfig(sparsity=0.25))
    >>> report.rows[0].sparsity, report.to_dict()["totals"]["zeros_after"]
    (0.25, 16)
"""

from __future__ import annotations

import dataclasses
from typing import Any

from slimtorch.core.table import text_table


@dataclasses.dataclass
class PruneRow:
    """One targeted layer: pruned or skipped (with the reason), and its zero counts."""

    name: str
    module_type: str
    action: str
    reason: str | None = None
    params: int = 0
    zeros_before: int = 0
    zeros_after: int = 0

    @property
    def sparsity(self) -> float:
        """``zeros_after / params`` (0 for an empty layer)."""
        return self.zeros_after / self.params if self.params else 0.0


@dataclasses.dataclass
class PruneReport:
    """Rows for every targeted layer, the config used and the transform entry recorded."""

    method: str
    config: dict[str, Any]
    rows: list[PruneRow]
    entry: dict[str, Any] | None = None

    @property
    def pruned(self) -> list[PruneRow]:
        """Rows with ``action == "pruned"``."""
        return [r for r in self.rows if r.action == "pruned"]

    @property
    def skipped(self) -> list[PruneRow]:
        """Rows with ``action == "skipped"``."""
        return [r for r in self.rows if r.action == "skipped"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: method, config, per-layer rows (with sparsity), totals, entry."""
        params = sum(r.params for r in self.rows)
        zeros = sum(r.zeros_after for r in self.rows)
        return {
            "method": self.method,
            "config": self.config,
            "layers": [{**dataclasses.asdict(r), "sparsity": r.sparsity} for r in self.rows],
            "totals": {
                "params": params,
                "zeros_before": sum(r.zeros_before for r in self.rows),
                "zeros_after": zeros,
                "sparsity": zeros / params if params else 0.0,
                "pruned": len(self.pruned),
                "skipped": len(self.skipped),
            },
            "entry": self.entry,
        }

    def to_table(self) -> str:
        """A fixed-width text table, one line per layer."""
        lines: list[tuple[str, ...]] = [
            ("layer", "action", "params", "zeros", "sparsity", "reason")
        ]
        for r in self.rows:
            lines.append(
                (
                    r.name,
                    r.action,
                    f"{r.params:,}",
                    f"{r.zeros_before:,} -> {r.zeros_after:,}",
                    f"{r.sparsity:.3f}",
                    r.reason or "",
                )
            )
        return text_table(lines)
