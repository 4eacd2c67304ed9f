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
    """

    epoch: list[int] = dataclasses.field(default_factory=list)
    train_loss: list[float | None] = dataclasses.field(default_factory=list)
    train_accuracy: list[float | None] = dataclasses.field(default_factory=list)
    val_loss: list[float | None] = dataclasses.field(default_factory=list)
    val_accuracy: list[float | None] = dataclasses.field(default_factory=list)
    lr: list[float | None] = dataclasses.field(default_factory=list)
    images_per_s: list[float | None] = dataclasses.field(default_factory=list)
    epoch_time_s: list[float | None] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.epoch)

    def append(self, row: dict[str, Any]) -> None:
        """Add one epoch; keys missing from ``row`` are recorded as ``None``.

        Example:
            >>> History().append({"epoch": 1, "val_loss": 0.3})
        """
        names = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(row) - set(names))
        if unknown:
            raise ValueError(f"unknown History key(s) {unknown}; valid keys: {names}")
        for name in names:
            getattr(self, name).append(row.get(name))

    def to_dict(self) -> dict[str, list[Any]]:
        """A JSON-ready dict of lists.

        Example:
            >>> History().to_dict()["epoch"]
            []
        """
        return {f.name: list(getattr(self, f.name)) for f in dataclasses.fields(self)}

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
        return cls(**{k: list(v) for k, v in data.items()})
