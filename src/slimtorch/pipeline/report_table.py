"""The compress report's before/after table, the rows of what a method's finish step timed, and
the per-layer table of ``mixed`` with its header.

Example:
    >>> _row("latency cpu (ms)", 0.002, 0.001)
    'latency cpu (ms)                  2.000        1.000    0.50x'
"""

from __future__ import annotations

from typing import Any

from slimtorch.core.measure import ModelProfile, compare_profiles
from slimtorch.core.measure.profile import format_ratio


def report_table(
    acc_before: float,
    acc_after: float,
    before: ModelProfile,
    after: ModelProfile,
    side_by_side: dict[str, Any] | None = None,
    saved: tuple[str, int, int] | None = None,
) -> str:
    """The before/after table; with ``side_by_side`` its latency row holds the two models timed
    in alternating rounds at the end of the run, not the two profiles taken minutes apart.
    ``saved`` (label, bytes before, bytes after) adds a row after the in-memory size: what the
    model takes saved, where int4 weights are packed and a pruned model's zeros cost nothing."""
    head = f"{'metric':<26} {'before':>12} {'after':>12} {'ratio':>8}"
    acc = f"{'test accuracy (%)':<26} {100 * acc_before:>12.2f} {100 * acc_after:>12.2f} "
    acc += f"{100 * (acc_after - acc_before):>+7.2f}p"
    lines = compare_profiles(before, after).splitlines()[1:]
    if side_by_side is not None:
        label = f"latency {after.latency.device} (ms)"
        lines = [
            _row(label, side_by_side["before_s"], side_by_side["after_s"])
            if line.startswith(label)
            else line
            for line in lines
        ]
        mem = side_by_side.get("memory")
        if mem is not None:
            b, a = mem["before_bytes"] / 1e6, mem["after_bytes"] / 1e6
            ratio = ("~" if mem["overlap"] else "") + format_ratio(b, a)
            row = f"{'peak memory (MB)':<26} {b:>12.3f} {a:>12.3f} {ratio:>8}"
            lines = [row if line.startswith("peak memory (MB)") else line for line in lines]
    if saved is not None:
        label, b0, b1 = saved
        at = next((i + 1 for i, line in enumerate(lines) if line.startswith("size (MB)")), 0)
        row = f"{label:<26} {b0 / 1e6:>12.3f} {b1 / 1e6:>12.3f} {format_ratio(b0, b1):>8}"
        lines.insert(at, row)
    return "\n".join([head, acc, *lines])


_REASON_WIDTH = 60
"""The longest skip reason kept in its table row; a longer one goes in a note below."""


def _row(name: str, before_s: float, after_s: float) -> str:
    """One timed row of the before/after table (milliseconds, ``after / before``)."""
    ratio = format_ratio(before_s, after_s)
    return f"{name:<26} {before_s * 1e3:>12.3f} {after_s * 1e3:>12.3f} {ratio:>8}"


def _sparse_rows(sparse: dict[str, Any]) -> list[str]:
    """What the pruning methods' sparse-kernel check found (``sparse_kernels``)."""
    label = f"{'sparse kernels':<26}"
    if sparse.get("skipped"):
        return [f"{label} skipped: {sparse['skipped']}"]
    timed = sparse["model"]
    if not timed:
        return [
            f"{label} none faster than dense here ({sparse['timed_layers']} layers timed at "
            f"batch {sparse['batch']})"
        ]
    if not timed.get("kept"):
        return [
            f"{label} some layers faster alone, the model {timed['speedup']:.2f}x as fast with "
            "them: all stay dense"
        ]
    n, of = len(sparse["sparse_layers"]), sparse["timed_layers"]
    return [
        _row("latency sparse kernels (ms)", timed["dense_s"], timed["sparse_s"]),
        f"(a sparse kernel runs {n} of {of} layers faster)",
    ]


def finish_rows(finished: dict[str, Any] | None) -> list[str]:
    """Table rows for what a method's ``finish`` step timed: both models compiled
    (``compiled_latency``), the float and int8 models in each int8 runtime (``runtimes``), and
    the pruned model with sparse kernels (``sparse_kernels``)."""
    if not finished:
        return []
    rows = []
    timed = finished.get("compiled_latency")
    if timed:
        rows.append(_row("latency compiled (ms)", timed["before_s"], timed["after_s"]))
    untimed: dict[str, list[str]] = {}  # a reason too long for its row -> the runtimes
    runtimes = finished.get("runtimes") or {}
    for name, t in runtimes.items():
        label = f"latency {name} (ms)"
        if not t["skipped"]:
            rows.append(_row(label, t["fp32_s"], t["int8_s"]))
        elif len(t["skipped"]) <= _REASON_WIDTH:
            rows.append(f"{label:<26} skipped: {t['skipped']}")
        else:  # the whole reason in a note under the table, never cut
            rows.append(f"{label:<26} skipped (see below)")
            untimed.setdefault(t["skipped"], []).append(name)
    if finished.get("sparse_kernels"):
        rows += _sparse_rows(finished["sparse_kernels"])
    rows += [f"({' and '.join(names)} not timed: {why})" for why, names in untimed.items()]
    if any(not t["skipped"] for t in runtimes.values()):
        rows.append(
            "(the eager latency row simulates int8 in float; a runtime row times the float and "
            "the int8 model in that runtime, int8 kernels running)"
        )
    if finished.get("hint"):
        rows.append(f"({finished['hint']})")
    return rows
