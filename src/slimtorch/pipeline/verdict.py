"""The one-line verdict of a compress run: smaller, faster, and at what accuracy, as measured.

Users' first complaint about compression tools is "smaller but not faster": a ratio of parameters
quoted as a speed-up. A compress report therefore ends with a verdict built only from what the run
measured:

- **size**: ``after / before`` of the bytes the model is saved in (its state dict; the compact
  file for pruned models);
- **accuracy**: the change in test accuracy, in points;
- **speed**: one entry per timing the run took side by side in alternating rounds (the whole
  model eagerly on the device at hand, and where the method timed them, both models compiled,
  each int8 runtime, the sparse kernels). Each is called ``faster`` or ``slower`` only when the
  median ratio moved by at least :data:`MATERIAL` *and* a sign test over the paired rounds says
  that same direction is not chance (two-sided p at most :data:`ALPHA`: 9 of 9 or 8 of 9
  rounds, 7 of 7, 5 of 5); otherwise ``unchanged``. A timing without rounds needs a 10% move.

Example:
    >>> v = make_verdict(
    ...     size_before=1000, size_after=360, acc_before=0.9439, acc_after=0.9203,
    ...     timings=[speed_entry("cpu", 1.05, faster_rounds=9, rounds=9)],
    ... )
    >>> v["headline"], v["speed"][0]["verdict"]
    ('smaller and faster', 'faster')
    >>> head, timing = v["text"].split("; ")
    >>> head
    'verdict: smaller and faster: 0.36x the size, -2.36 points'
    >>> timing
    'cpu: 1.05x speed, faster (9 of 9 rounds faster)'
"""

from __future__ import annotations

import math
from typing import Any

MATERIAL = 0.03
"""Smallest relative change of a median time that the verdict calls faster or slower."""

ALPHA = 0.1
"""Largest two-sided sign-test p-value at which the rounds' direction is taken as real."""

UNROUNDED_MATERIAL = 0.10
"""Relative change needed from a timing that kept no per-round figures."""


def sign_test_p(wins: int, rounds: int) -> float:
    """Two-sided sign-test p-value of ``wins`` faster rounds out of ``rounds`` (ties: none).

    Example:
        >>> round(sign_test_p(8, 9), 3), round(sign_test_p(5, 5), 4), sign_test_p(2, 4)
        (0.039, 0.0625, 1.0)
    """
    if rounds <= 0 or not 0 <= wins <= rounds:
        raise ValueError(f"need 0 <= wins <= rounds and rounds >= 1, got {wins} of {rounds}")
    k = max(wins, rounds - wins)
    tail = sum(math.comb(rounds, i) for i in range(k, rounds + 1)) / 2**rounds
    return min(1.0, 2 * tail)


def classify_speed(speedup: float, faster_rounds: int | None, rounds: int | None) -> str:
    """``"faster"``, ``"slower"`` or ``"unchanged"`` for one side-by-side timing.

    Example:
        >>> classify_speed(1.05, 9, 9), classify_speed(1.05, 6, 9), classify_speed(1.01, 9, 9)
        ('faster', 'unchanged', 'unchanged')
        >>> classify_speed(0.5, 0, 7), classify_speed(0.5, None, None)
        ('slower', 'slower')

    The rounds must lean the way the median moved: a median 0.84x with 8 of 9 rounds faster
    (the two measures disagree: noise) is ``unchanged``.

        >>> classify_speed(0.84, 8, 9), classify_speed(1.2, 0, 7)
        ('unchanged', 'unchanged')
    """
    if not math.isfinite(speedup) or speedup <= 0:
        return "unchanged"
    if faster_rounds is None or rounds is None:
        material, faster_ok, slower_ok = UNROUNDED_MATERIAL, True, True
    else:
        lopsided = sign_test_p(faster_rounds, rounds) <= ALPHA
        material = MATERIAL
        faster_ok = lopsided and 2 * faster_rounds > rounds
        slower_ok = lopsided and 2 * faster_rounds < rounds
    if faster_ok and speedup >= 1 + material:
        return "faster"
    if slower_ok and speedup <= 1 / (1 + material):
        return "slower"
    return "unchanged"


def speed_entry(
    where: str,
    speedup: float,
    *,
    faster_rounds: int | None = None,
    rounds: int | None = None,
    note: str | None = None,
) -> dict[str, Any]:
    """One timing of the verdict (``speedup`` = before / after time, > 1: faster)."""
    return {
        "where": where,
        "speedup": float(speedup),
        "faster_rounds": faster_rounds,
        "rounds": rounds,
        "verdict": classify_speed(float(speedup), faster_rounds, rounds),
        "note": note,
    }


def finish_timings(finished: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The speed entries of what a method's finishing step timed side by side."""
    if not finished:
        return []
    out = []
    compiled = finished.get("compiled_latency")
    if compiled:
        out.append(
            speed_entry(
                "compiled",
                compiled["speedup"],
                faster_rounds=compiled.get("faster_rounds"),
                rounds=compiled.get("rounds"),
            )
        )
    for name, t in (finished.get("runtimes") or {}).items():
        if not t.get("skipped") and t.get("speedup") is not None:
            out.append(
                speed_entry(
                    name,
                    t["speedup"],
                    faster_rounds=t.get("faster_rounds"),
                    rounds=t.get("rounds"),
                    note="int8 kernels",
                )
            )
    sparse = (finished.get("sparse_kernels") or {}).get("model") or {}
    if sparse.get("kept"):
        per_round = sparse.get("speedup_per_round") or []
        out.append(
            speed_entry(
                "sparse kernels",
                sparse["speedup"],
                faster_rounds=sum(r > 1 for r in per_round) if per_round else None,
                rounds=len(per_round) or None,
            )
        )
    return out


def _describe(entry: dict[str, Any]) -> str:
    """``where (note): 1.97x speed, faster (7 of 7 rounds faster)``."""
    note = f" ({entry['note']})" if entry.get("note") else ""
    rounds = ""
    if entry["rounds"] is not None and entry["faster_rounds"] is not None:
        rounds = f" ({entry['faster_rounds']} of {entry['rounds']} rounds faster)"
    return f"{entry['where']}{note}: {entry['speedup']:.2f}x speed, {entry['verdict']}{rounds}"


def make_verdict(
    *,
    size_before: int,
    size_after: int,
    acc_before: float,
    acc_after: float,
    timings: list[dict[str, Any]],
    size_what: str | None = None,
) -> dict[str, Any]:
    """The verdict of one run (see the module docstring); ``text`` is its one-line form.

    ``headline`` is ``smaller and faster``, ``smaller, not faster``, ``faster, not smaller``,
    ``neither smaller nor faster``, or ``smaller, but slower`` / ``slower`` (no timing faster,
    one slower). "Faster" needs one timing called faster: a method whose int8 model only runs
    fast in a compiled runtime is faster there, and the line says where. ``size_what`` names
    what ``size_after`` counts when it is not the saved state dict (``"compact file"`` for
    pruned models).
    """
    size_ratio = size_after / size_before if size_before > 0 else float("nan")
    smaller = size_ratio < 1 - MATERIAL
    kinds = {t["verdict"] for t in timings}
    if "faster" in kinds:
        headline = "smaller and faster" if smaller else "faster, not smaller"
    elif "slower" in kinds:
        headline = "smaller, but slower" if smaller else "slower"
    else:
        headline = "smaller, not faster" if smaller else "neither smaller nor faster"
    points = 100.0 * (acc_after - acc_before)
    what = f" ({size_what})" if size_what else ""
    parts = [f"{size_ratio:.2f}x the size{what}", f"{points:+.2f} points"]
    text = f"verdict: {headline}: {', '.join(parts)}"
    if timings:
        text += "; " + "; ".join(_describe(t) for t in timings)
    return {
        "headline": headline,
        "size_ratio": size_ratio,
        "size_what": size_what or "state dict",
        "accuracy_points": points,
        "speed": timings,
        "faster": "faster" in kinds,
        "text": text,
    }


__all__ = [
    "ALPHA",
    "MATERIAL",
    "classify_speed",
    "finish_timings",
    "make_verdict",
    "sign_test_p",
    "speed_entry",
]
