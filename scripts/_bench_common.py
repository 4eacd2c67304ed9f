"""Pieces the benchmark scripts share: model-directory arguments, positive-integer options, the
CPU's model name, the dataset a model was trained on, and the command line a result records.

The scripts import it as ``_bench_common`` (``scripts/`` is on ``sys.path`` when a script runs).
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slimtorch.cli.common import model_dir_arg


def model_dir(path: str | Path, option: str = "--model-dir") -> Path:
    """The model directory ``path`` names: itself, or the ``model/`` folder of a run directory
    (the ``--out`` of ``slimtorch train`` or ``slimtorch compress``).

    Raises:
        ValueError: naming ``option`` when ``path`` holds no model (missing, a file, or a
            folder with no ``config.json`` in it or in its ``model/``).
    """
    return model_dir_arg(str(path), option)


def model_dir_type(option: str) -> Any:
    """An argparse ``type`` for ``option``: :func:`model_dir`, reported as a usage error."""

    def parse(text: str) -> Path:
        try:
            return model_dir(text, option)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = "model directory"
    return parse


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1 (threads, batch sizes, rounds, repeats)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def positive_ints(text: str) -> list[int]:
    """An argparse ``type``: a comma-separated list of integers >= 1 (``"1,32"``)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(
            f"must be a comma-separated list of integers >= 1, got {text!r}"
        )
    try:
        return [positive_int(p) for p in parts]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"must be a comma-separated list of integers >= 1, got {text!r}"
        ) from None


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name") and ":" in line:
                    name = line.split(":", 1)[1].strip()
                    if name:
                        return name
    except OSError:
        pass
    return platform.processor() or platform.machine()


def card_dataset(card: Any, requested: str | None, default: str = "fashion-mnist") -> str:
    """The dataset to evaluate a model on: ``requested``, else the one its card names (the
    dataset it was trained on), else ``default``.

    A ``requested`` dataset other than the card's is used as asked, with a warning on stderr:
    scores on another dataset than the training one are rarely what was meant.
    """
    extra = getattr(card, "extra", None) or {}
    trained_on = extra.get("dataset") if isinstance(extra, dict) else None
    if requested is None:
        return str(trained_on) if trained_on else default
    if trained_on and requested != trained_on:
        print(
            f"warning: --dataset {requested} differs from the dataset the model was trained "
            f"on ({trained_on}, from its model card); evaluating on {requested}",
            file=sys.stderr,
        )
    return requested


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The shell command that runs ``script`` with ``argv`` (``sys.argv[1:]`` when None)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["python", script, *args])
