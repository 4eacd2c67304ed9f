"""Regenerate the generated tables of docs/benchmarks.md from docs/results/*.json.

Each results file is written by a benchmark script (its ``command``, ``device`` and ``date``
are inside). The text between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` markers in
docs/benchmarks.md is replaced by the table rendered from ``docs/results/name.json``.

    python scripts/render_benchmarks.py
    python scripts/render_benchmarks.py --check   # exit 1 if docs/benchmarks.md is out of date

A results file that lacks what its table needs stops the run with an error naming the file and
the missing key; nothing is written then.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path
from typing import Any

from slimtorch.core.io import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "docs" / "results"


class RenderError(ValueError):
    """A results file cannot be rendered (unreadable, or lacking what its table needs)."""


def _table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _meta(d: dict[str, Any]) -> str:
    bits = [f"device: {d.get('device')}", f"torch {d.get('torch')}", f"date {d.get('date')}"]
    if d.get("threads"):
        bits.append(f"{d['threads']} torch threads")
    text = "; ".join(bits)
    if d.get("command"):
        cmd = d["command"]
        text += f"\n\n`{'python ' if cmd.startswith('scripts/') else ''}{cmd}`"
    return text


def render(name: str, d: dict[str, Any]) -> str:
    if "roofline" in d:
        rows = [
            [
                r["model"],
                r["batch_size"],
                r["profile"],
                f"{r['measured_ms']:.3f} ({r['measured_p10_ms']:.3f}-{r['measured_p90_ms']:.3f})",
                f"{r['estimated_ms']:.3f}",
                f"{r['est_compute_ms']:.3f} / {r['est_memory_ms']:.3f} / {r['est_launch_ms']:.3f}",
                r["kernels"],
                f"{r['measured_over_estimate']:.2f}",
            ]
            for r in d["roofline"]
        ]
        hdr = [
            "model",
            "batch",
            "profile",
            "measured ms median (p10-p90)",
            "estimated ms",
            "est. compute / memory / launch ms",
            "kernels",
            "measured / estimate",
        ]
        return _meta(d) + "\n\n" + _table(hdr, rows)
    if "loader" in d:
        rows = [
            [
                r["batch_size"],
                f"{r['loader_images_per_s']:.0f}",
                f"{r['synthetic_images_per_s']:.0f}",
                f"{100 * r['loader_share_of_step']:.1f}%",
            ]
            for r in d["loader"]
        ]
        hdr = ["batch", "device loader img/s", "synthetic img/s", "loader share of step"]
        return _meta(d) + "\n\n" + _table(hdr, rows)
    if "accuracy" in d:
        rows = [
            [
                r["model"],
                r["dataset"],
                r["epochs"],
                r["batch_size"],
                r["lr"],
                r["amp"],
                f"{100 * r['test_accuracy']:.2f}%",
                f"{r['train_seconds']:.0f}",
                f"`{r['command']}`",
            ]
            for r in d["accuracy"]
        ]
        hdr = [
            "model",
            "dataset",
            "epochs",
            "batch",
            "lr",
            "amp",
            "test top-1",
            "train s",
            "command",
        ]
        return _meta(d) + "\n\n" + _table(hdr, rows)
    raise RenderError("no known section (roofline, loader, accuracy)")


def render_file(path: Path) -> str:
    """The table of one results file; :class:`RenderError` names the file and what is wrong."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RenderError(f"{path}: cannot read it as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RenderError(f"{path}: expected a JSON object, got {type(data).__name__}")
    try:
        return render(path.stem, data)
    except RenderError as exc:
        raise RenderError(f"{path}: {exc}") from None
    except KeyError as exc:
        raise RenderError(f"{path}: missing key {exc.args[0]!r} in a row of its table") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise RenderError(f"{path}: malformed results ({type(exc).__name__}: {exc})") from None


def render_doc(text: str, results: Path) -> str:
    """``text`` with every marked section replaced by the table of its results file."""
    for path in sorted(results.glob("*.json")):
        name = path.stem
        begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
        pattern = re.compile(rf"({re.escape(begin)}).*?({re.escape(end)})", re.S)
        if not pattern.search(text):
            continue
        body = render_file(path)
        text = pattern.sub(lambda m, b=body: m.group(1) + "\n" + b + "\n" + m.group(2), text)
    return text


def diff_summary(old: str, new: str, name: str, max_lines: int = 40) -> str:
    """A unified diff of ``old`` to ``new``, cut at ``max_lines`` lines."""
    lines = list(
        difflib.unified_diff(
            old.splitlines(), new.splitlines(), f"{name} (on disk)", f"{name} (rendered)",
            lineterm="",
        )
    )  # fmt: skip
    changed = sum(1 for ln in lines if ln[:1] in "+-" and ln[:3] not in ("+++", "---"))
    head = f"{name} is out of date: {changed} line(s) differ; run scripts/render_benchmarks.py"
    shown = lines[:max_lines]
    if len(lines) > max_lines:
        shown.append(f"... ({len(lines) - max_lines} more diff lines)")
    return "\n".join([head, *shown])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--check",
        action="store_true",
        help="render in memory and exit 1, with a diff, if the document differs; write nothing",
    )
    ap.add_argument("--doc", type=Path, default=DOC, help="the document (docs/benchmarks.md)")
    ap.add_argument(
        "--results", type=Path, default=RESULTS, help="folder of results JSON (docs/results)"
    )
    args = ap.parse_args(argv)
    if not args.doc.is_file():
        ap.error(f"--doc {args.doc} is not a file")
    if not args.results.is_dir():
        ap.error(f"--results {args.results} is not a folder")
    old = args.doc.read_text(encoding="utf-8")
    try:
        new = render_doc(old, args.results)
    except RenderError as exc:
        print(f"render_benchmarks: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if new == old:
            print(f"{args.doc} is up to date")
            return 0
        print(diff_summary(old, new, str(args.doc)), file=sys.stderr)
        return 1
    if new != old:
        atomic_write_text(args.doc, new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
