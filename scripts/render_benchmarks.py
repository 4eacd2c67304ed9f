"""Regenerate the generated tables of docs/benchmarks.md from docs/results/*.json.

Each results file is written by a benchmark script (its ``command``, ``device`` and ``date``
are inside). The text between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` markers in
docs/benchmarks.md is replaced by the table rendered from ``docs/results/name.json``.

    python scripts/render_benchmarks.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"


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
    raise ValueError(f"docs/results/{name}.json: no known section (roofline, loader, accuracy)")


def main() -> None:
    text = DOC.read_text()
    for path in sorted((ROOT / "docs" / "results").glob("*.json")):
        name = path.stem
        begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
        pattern = re.compile(rf"({re.escape(begin)}).*?({re.escape(end)})", re.S)
        if not pattern.search(text):
            continue
        body = render(name, json.loads(path.read_text()))
        text = pattern.sub(lambda m, b=body: m.group(1) + "\n" + b + "\n" + m.group(2), text)
    DOC.write_text(text)


if __name__ == "__main__":
    main()
