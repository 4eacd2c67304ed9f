"""Training checkpoints: one ``checkpoint.pt`` written atomically, read with ``weights_only``.

A checkpoint holds only tensors, dicts, lists, tuples, numbers, strings and ``None``, so it is
loaded with ``torch.load(..., weights_only=True)``: opening it never runs arbitrary code.

Example:
    >>> import tempfile, pathlib; d = pathlib.Path(tempfile.mkdtemp())
    >>> model = nn.Linear(4, 2)
    >>> path = save_checkpoint(d / "checkpoint.pt", {"model": model.state_dict(), "epoch": 3})
    >>> state = load_checkpoint(path, required=("model", "epoch"))
    >>> state["epoch"], torch.equal(state["model"]["weight"], model.weight)
    (3, True)
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from slimtorch.core.errors import CheckpointError
from slimtorch.core.io import atomic_write

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "slimtorch.train.checkpoint"
CHECKPOINT_VERSION = 1

_WHAT_TO_DO = (
    "delete or move the file to start the run from scratch, or point out_dir at a folder "
    "holding a checkpoint written by slimtorch.train"
)


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write ``state`` (plus format markers) to ``path`` atomically.

    Args:
        path: Destination file; its folder is created.
        state: Checkpoint-safe content (see the module docstring).

    Returns:
        The path written.

    Example:
        >>> import tempfile, pathlib; d = pathlib.Path(tempfile.mkdtemp())
        >>> path = save_checkpoint(d / "run" / "checkpoint.pt", {"epoch": 0})  # makes run/
        >>> path == d / "run" / "checkpoint.pt", path.is_file()
        (True, True)
    """
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    required: Iterable[str] = (),
    map_location: str | torch.device | None = "cpu",
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: The checkpoint file.
        required: Keys that must be present.
        map_location: Where tensors are loaded (CPU by default).

    Returns:
        The stored dict.

    Raises:
        CheckpointError: The file is missing, unreadable, not a slimtorch checkpoint, of an
            unknown version, or lacks a required key.

    Example:
        >>> import tempfile, pathlib; d = pathlib.Path(tempfile.mkdtemp())
        >>> path = save_checkpoint(d / "checkpoint.pt", {"epoch": 3})
        >>> sorted(load_checkpoint(path, required=("epoch",)))
        ['epoch', 'format', 'version']
        >>> load_checkpoint(path, required=("model",))
        Traceback (most recent call last):
        ...
        slimtorch.core.errors.CheckpointError: checkpoint ... lacks model; it is incomplete; ...
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; expected a file written by a run")
    _check_crc(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} could not be read ({type(exc).__name__}: {exc}); it is corrupt, "
            f"truncated or holds objects other than tensors and plain data; {_WHAT_TO_DO}"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a slimtorch training checkpoint (expected a dict with "
            f"format={CHECKPOINT_FORMAT!r}); {_WHAT_TO_DO}"
        )
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has version {state.get('version')!r}, expected "
            f"{CHECKPOINT_VERSION}; resume it with the slimtorch release that wrote it or "
            f"{_WHAT_TO_DO}"
        )
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} lacks {', '.join(missing)}; it is incomplete; {_WHAT_TO_DO}"
        )
    return state


def _check_crc(path: Path) -> None:
    """Refuse a checkpoint whose stored CRC-32s do not match its bytes: ``torch.load`` does not
    check them, so a flipped bit inside a tensor would load as a different weight."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return  # not a readable zip: torch.load names what is wrong with it
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: the CRC of its entry {bad!r} does not match its "
            f"bytes (a damaged disk or copy); {_WHAT_TO_DO}"
        )


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a training checkpoint slimtorch wrote, told without unpickling it:
    the format name is in the bytes of its pickle (a file of the user's named checkpoint.pt is
    not, so commands refuse to replace it)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            return len(names) == 1 and CHECKPOINT_FORMAT.encode() in archive.read(names[0])
    except (OSError, zipfile.BadZipFile):
        return False
