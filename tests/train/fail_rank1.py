"""Imported by a rank (``SLIMTORCH_IMPORT``): rank 1's Trainer.fit raises, rank 0 goes on."""

from __future__ import annotations

import os

from slimtorch.train import trainer

_fit = trainer.Trainer.fit


def _failing_fit(self: trainer.Trainer, *args: object, **kwargs: object) -> object:
    if os.environ.get("RANK") == "1":
        raise ValueError("injected failure on rank 1")
    return _fit(self, *args, **kwargs)  # type: ignore[arg-type]


trainer.Trainer.fit = _failing_fit  # type: ignore[method-assign,assignment]
