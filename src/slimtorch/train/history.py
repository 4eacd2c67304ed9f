"""Per-epoch training history: what :meth:`Trainer.fit` returns and writes to ``history.json``.

Example:
    >>> h = History()
    >>> h.append({"epoch": 1, "train_loss": 0.5, "train_accuracy": 0.9, "lr": 0.1})
    >>> h.to_dict()["train_loss"]
    [0.5]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Self


@dataclasses.dataclass
class History:
    """One list per metric, one entry per finished epoch (``None`` where not measured).

    Attributes:
        epoch: 1-based epoch numbers.
        train_loss: Mean training loss over the epoch's samples (all ranks).
        train_accuracy: Training top-1 accuracy in [0, 1] (``None`` for non-classification).
        val_loss: Validation loss (``None`` on epochs without validation).
        val_accuracy: Validation top-1 accuracy.
        lr: Learning rate of the first param group at the end of the epoch.
        images_per_s: Training samples per second over all ranks.
        epoch_time_s: Wall-clock seconds of the training part of the epoch.
        eval_split: The split the ``val_*`` entries were measured on (``Trainer.eval_name``):
            ``"val"`` (a held-out part of the training set), ``"test"`` (runs that evaluate on
            the test split each epoch), or a name the caller gave.
    """

    epoch: list[int] = dataclasses.field(default_factory=list)
    train_loss: list[float | None] = dataclasses.field(default_factory=list)
    train_accuracy: list[float | None] = dataclasses.field(default_factory=list)
    val_loss: list[float | None] = dataclasses.field(default_factory=list)
    val_accuracy: list[float | None] = dataclasses.field(default_factory=list)
    lr: list[float | None] = dataclasses.field(default_factory=list)
    images_per_s: list[float | None] = dataclasses.field(default_factory=list)
    epoch_time_s: list[float | None] = dataclasses.field(default_factory=list)
    eval_split: str = "val"

    def __len__(self) -> int:
        return len(self.epoch)

    def append(self, row: dict[str, Any]) -> None:
        """Add one epoch; keys missing from ``row`` are recorded as ``None``.

        Example:
            >>> History().append({"epoch": 1, "val_loss": 0.3})
        """
        names = _columns(self)
        unknown = sorted(set(row) - set(names))
        if unknown:
            raise ValueError(f"unknown History key(s) {unknown}; valid keys: {names}")
        for name in names:
            getattr(self, name).append(row.get(name))

    def to_dict(self) -> dict[str, list[Any]]:
        """A JSON-ready dict of lists.

        Example:
            >>> History().to_dict()["epoch"], History().to_dict()["eval_split"]
            ([], 'val')
        """
        data: dict[str, Any] = {name: list(getattr(self, name)) for name in _columns(self)}
        data["eval_split"] = self.eval_split
        return data

    @classmethod
    def from_dict(cls, data: dict[str, list[Any]]) -> Self:
        """Rebuild from :meth:`to_dict` output (as stored in a checkpoint).

        Example:
            >>> History.from_dict(History().to_dict())
            History(epoch=[], ...)
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown History key(s) {unknown}; valid keys: {sorted(names)}")
        split = data.get("eval_split", "val")  # checkpoints written before the field: "val"
        if not isinstance(split, str):
            raise ValueError(f"History eval_split must be a split name, got {split!r}")
        columns = {k: list(v) for k, v in data.items() if k != "eval_split"}
        return cls(**columns, eval_split=str(split))


def _columns(history: History | type[History]) -> list[str]:
    """The per-epoch list fields (every field but ``eval_split``)."""
    return [f.name for f in dataclasses.fields(history) if f.name != "eval_split"]


def format_row(row: dict[str, Any], eval_split: str = "val") -> str:
    """``train_loss 0.312  train_accuracy 0.901 ...`` for the per-epoch log line, with the
    ``val_`` keys named after the split they were measured on.

    Example:
        >>> format_row({"epoch": 2, "train_loss": 0.3125, "val_accuracy": 0.9}, "test")
        'train_loss 0.3125  test_accuracy 0.9'
    """
    parts = []
    for key, value in row.items():
        if key == "epoch" or value is None:
            continue
        text = f"{value:.0f}" if key == "images_per_s" else f"{value:.4g}"
        parts.append(f"{key.replace('val_', f'{eval_split}_', 1)} {text}")
    return "  ".join(parts)
