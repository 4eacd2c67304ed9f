"""The loader protocol of the :class:`~slimtorch.train.Trainer`.

A loader is any iterable of ``(inputs, targets)`` batches with ``__len__`` (a torch
``DataLoader``, slimtorch's ``DeviceLoader``, a list of pairs). Two optional methods:

- ``set_epoch(epoch)``: called at the start of every epoch (reshuffle, pick a DDP shard);
- ``set_start_batch(k)``: the next ``iter()`` starts at batch ``k`` (used on mid-epoch resume;
  without it the first ``k`` batches are drawn and dropped).

Example:
    >>> loader = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(5)]
    >>> check_loader(loader, "train_loader")
    5
    >>> batches = iter_from(loader, start=3)  # resume after batch 3 of 5
    >>> len(list(batches))
    2
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any


def check_loader(loader: Any, name: str) -> int:
    """Check that ``loader`` follows the protocol and return its number of batches.

    Example:
        >>> check_loader([(1, 2), (3, 4)], "val_loader")
        2
    """
    if not isinstance(loader, Iterable) or not hasattr(loader, "__len__"):
        raise TypeError(
            f"{name} must be an iterable of (inputs, targets) batches with __len__, got "
            f"{type(loader).__name__}; wrap it in a DataLoader or a class with __iter__/__len__"
        )
    n = len(loader)  # type: ignore[arg-type]
    if n < 1:
        raise ValueError(f"{name} is empty (len 0); expected at least one batch")
    return int(n)


def split_batch(batch: Any) -> tuple[Any, Any]:
    """Return ``(inputs, targets)`` of a batch, raising ``TypeError`` for anything else.

    Example:
        >>> x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
        >>> split_batch((x, y))[1] is y
        True
    """
    if not isinstance(batch, tuple | list) or len(batch) != 2:
        size = f" of length {len(batch)}" if isinstance(batch, tuple | list) else ""
        raise TypeError(
            f"a loader batch must be an (inputs, targets) pair, got {type(batch).__name__}"
            f"{size}; make the loader yield (x, y)"
        )
    return batch[0], batch[1]


def iter_from(loader: Any, start: int) -> Iterator[Any]:
    """An iterator over ``loader`` that starts at batch ``start``.

    Example:
        >>> list(iter_from([(0, 0), (1, 1), (2, 2)], 2))
        [(2, 2)]
    """
    if start > 0 and hasattr(loader, "set_start_batch"):
        loader.set_start_batch(start)
        return iter(loader)
    it = iter(loader)
    for _ in range(start):
        next(it)
    return it
