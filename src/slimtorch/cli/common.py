"""Small helpers shared by the sub-commands (tables, shapes, thread pinning)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain text table with columns padded to their widest cell.

    Example:
        >>> print(format_table(["a", "b"], [[1, "xy"]]))
        a  b
        -  --
        1  xy
    """
    cells = [[str(c) for c in header], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse ``"1,28,28"`` into ``(1, 28, 28)``; raises ``ValueError`` with the expected form."""
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        raise ValueError(
            f"--input-shape must look like C,H,W (e.g. 1,28,28), got {text!r}"
        ) from None
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"--input-shape must be three positive integers C,H,W, got {text!r}")
    return shape


# Choices are listed statically so that `--help` and bad-argument errors need no heavy imports;
# a test checks them against the registries.
MODELS = ("lenet5", "mlp", "mobilenetv2", "resnet20", "resnet32", "resnet56", "vgg11-bn")
DATASETS = ("cifar10", "digits", "fashion-mnist", "kmnist", "mnist")
NARROW_CONVS = ("measure", "int8", "float")  # slimtorch.quant.ort_graph.NARROW_CONV_MODES


def add_device_args(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--threads``, shared by the commands that run a model."""
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)"
    )


def apply_threads(args: argparse.Namespace) -> None:
    """Pin torch's CPU thread count when ``--threads`` was given."""
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)


def resolve_model_dir(path: str) -> Path:
    """Accept a model directory or a run directory holding one in ``model/``."""
    p = Path(path)
    if not (p / "config.json").is_file() and (p / "model" / "config.json").is_file():
        return p / "model"
    return p
