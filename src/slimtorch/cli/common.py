"""Small helpers shared by the sub-commands (tables, shapes, thread pinning, output paths)."""

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


def check_output_path(path: str, option: str, *, folder: bool) -> None:
    """Fail before any work when ``path`` cannot be written as ``option`` asks.

    A run directory (``folder=True``) cannot be a file, an output file cannot be a folder, and
    no existing part of the path above it may be a file.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> check_output_path(d, "--out", folder=True)
        >>> check_output_path(d, "--out", folder=False)
        Traceback (most recent call last):
        ...
        ValueError: --out ... is a folder; give the path of the file to write
    """
    p = Path(path)
    if folder and p.exists() and not p.is_dir():
        raise ValueError(f"{option} {path} is a file; give a folder (a run directory is written)")
    if not folder and p.is_dir():
        raise ValueError(f"{option} {path} is a folder; give the path of the file to write")
    above = next((q for q in p.parents if q.exists()), None)
    if above is not None and not above.is_dir():
        raise ValueError(f"{option} {path} cannot be written: {above} is a file, not a folder")


def options_that_need(
    args: argparse.Namespace, enabled: bool, enabler: str, defaults: dict[str, object]
) -> None:
    """Options that act only with ``enabler``: refuse them without it, else fill defaults.

    Each key of ``defaults`` is an option parsed with ``default=None`` (so that giving it can
    be told from leaving it out); a flag parsed with ``store_true`` has the default ``False``.

    Example:
        >>> args = argparse.Namespace(sparse=None, sparsity=0.5)
        >>> options_that_need(args, args.sparse is not None, "--sparse", {"sparsity": 0.9})
        Traceback (most recent call last):
        ...
        ValueError: --sparsity 0.5 applies only with --sparse; add --sparse or leave it out
    """
    given = []
    for key, default in defaults.items():
        value = getattr(args, key)
        flag = f"--{key.replace('_', '-')}"
        if default is False and value is True:  # a store_true flag
            given.append(flag)
        elif default is not False and value is not None:
            given.append(f"{flag} {value}")
    if given and not enabled:
        verb = "applies" if len(given) == 1 else "apply"
        raise ValueError(
            f"{', '.join(given)} {verb} only with {enabler}; add {enabler} or leave it out"
        )
    for key, default in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, default)
