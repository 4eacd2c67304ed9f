"""The per-layer report of :func:`~slimtorch.sparse.sparsify_`: candidates, times, choice, reason.

Example:
    >>> row = SparsifyRow("fc", "Linear", "dense", reason="no candidate", dense_s=1e-4)
    >>> SparsifyReport("cpu", 1, 1.05, ["csr"], [row]).to_dict()["totals"]["sparse"]
    0
"""

from __future__ import annotations

import dataclasses
from typing import Any

from slimtorch.core.table import text_table


@dataclasses.dataclass
class Candidate:
    """One sparse kernel tried on one layer.

    Attributes:
        fmt: ``"csr"``, ``"bsr"`` or ``"semi_structured"``.
        status: ``"ok"`` (same outputs, timed), ``"mismatch"`` (outputs differ beyond the
            tolerance), ``"unavailable"`` (no such kernel for this layer/device) or ``"error"``
            (the backend raised).
        median_s: Measured median time of the layer call (``None`` unless ``ok``).
        speedup: Dense median / this median (``None`` unless ``ok``).
        max_abs_err: Largest absolute output difference to dense (``None`` if not run).
        reason: Why it is not ``ok``.
    """

    fmt: str
    status: str
    median_s: float | None = None
    speedup: float | None = None
    max_abs_err: float | None = None
    reason: str | None = None


@dataclasses.dataclass
class SparsifyRow:
    """One targeted layer: what was measured and what was chosen.

    ``action`` is ``"sparse"`` (swapped for the ``choice`` kernel), ``"dense"`` (measured or
    judged not to pay; ``reason`` says which) or ``"skipped"`` (not measurable: not called by
    the example input, or no sparse kernel applies).
    """

    name: str
    module_type: str
    action: str
    choice: str = "dense"
    reason: str | None = None
    input_shape: list[int] | None = None
    sparsity: float = 0.0
    dense_s: float | None = None
    candidates: list[Candidate] = dataclasses.field(default_factory=list)

    @property
    def speedup(self) -> float | None:
        """The chosen kernel's speed-up over dense (``None`` when dense stays)."""
        for c in self.candidates:
            if c.fmt == self.choice:
                return c.speedup
        return None


@dataclasses.dataclass
class SparsifyReport:
    """Every targeted layer of one :func:`~slimtorch.sparse.sparsify_` call.

    Attributes:
        device: Where it was measured.
        threads: CPU threads during the timings.
        min_speedup: The speed-up a kernel had to reach.
        formats: The candidate formats.
        rows: One per targeted layer, in module order.
        notes: Device-level statements (e.g. that 2:4 is storage-only here).
        model: The whole-model check: median dense and sparse times, per-round speed-ups,
            and whether the swaps were kept (empty when nothing was swapped or not checked).
    """

    device: str
    threads: int
    min_speedup: float
    formats: list[str]
    rows: list[SparsifyRow]
    notes: list[str] = dataclasses.field(default_factory=list)
    model: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def sparse(self) -> list[SparsifyRow]:
        """Rows swapped for a sparse kernel."""
        return [r for r in self.rows if r.action == "sparse"]

    @property
    def skipped(self) -> list[SparsifyRow]:
        """Rows that could not be measured."""
        return [r for r in self.rows if r.action == "skipped"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: settings, notes, per-layer rows with candidates, totals."""
        dense = sum(r.dense_s or 0.0 for r in self.rows)
        after = 0.0
        for r in self.rows:
            chosen = next((c for c in r.candidates if c.fmt == r.choice), None)
            after += chosen.median_s if chosen and chosen.median_s else (r.dense_s or 0.0)
        return {
            "device": self.device,
            "threads": self.threads,
            "min_speedup": self.min_speedup,
            "formats": list(self.formats),
            "notes": list(self.notes),
            "model": dict(self.model),
            "layers": [{**dataclasses.asdict(r), "speedup": r.speedup} for r in self.rows],
            "totals": {
                "layers": len(self.rows),
                "sparse": len(self.sparse),
                "skipped": len(self.skipped),
                "dense_s": dense,
                "after_s": after,
            },
        }

    def to_table(self) -> str:
        """A fixed-width text table, one line per layer, times in microseconds."""
        header = ["layer", "action", "choice", "sparsity", "dense_us"] + [
            f"{f}_us" for f in self.formats
        ]
        lines = [header]
        for r in self.rows:
            times = {c.fmt: c for c in r.candidates}
            cells = [r.name, r.action, r.choice, f"{r.sparsity:.3f}", _us(r.dense_s)]
            for f in self.formats:
                c = times.get(f)
                cells.append(
                    _us(c.median_s) if c and c.status == "ok" else (c.status if c else "-")
                )
            lines.append(cells)
        return "\n".join([text_table(lines), *self.notes])


def _us(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:.1f}"
