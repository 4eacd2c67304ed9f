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
from contextlib import contextmanager
from typing import Any

import torch


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


def split_batch(batch: Any, where: str = "a loader batch") -> tuple[Any, Any]:
    """Return ``(inputs, targets)`` of a batch, raising ``TypeError`` for anything else.

    ``where`` names the batch in the error (``"batch 3 of train_loader"``).

    Example:
        >>> x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
        >>> split_batch((x, y))[1] is y
        True
    """
    if not isinstance(batch, tuple | list) or len(batch) != 2:
        size = f" of length {len(batch)}" if isinstance(batch, tuple | list) else ""
        raise TypeError(
            f"{where} must be an (inputs, targets) pair, got {type(batch).__name__}"
            f"{size}; make the loader yield (x, y)"
        )
    return batch[0], batch[1]


def describe(obj: Any) -> str:
    """``float32 (8, 1, 28, 28) on cpu`` for a tensor, the type name for anything else.

    Example:
        >>> describe(torch.zeros(2, 3, dtype=torch.uint8))
        'uint8 (2, 3) on cpu'
    """
    if isinstance(obj, torch.Tensor):
        dtype = str(obj.dtype).removeprefix("torch.")
        return f"{dtype} {tuple(obj.shape)} on {obj.device.type}"
    return type(obj).__name__


@contextmanager
def batch_note(name: str, batch_idx: int, inputs: Any, targets: Any) -> Iterator[None]:
    """Add to an error raised inside (a forward pass, a loss) which batch of which loader it
    came from and the batch's dtypes and shapes: torch's own message names neither.

    Example:
        >>> try:
        ...     with batch_note("train_loader", 3, torch.zeros(2, 4, dtype=torch.uint8), None):
        ...         raise RuntimeError("mat1 and mat2 must have the same dtype")
        ... except RuntimeError as exc:
        ...     exc.__notes__[0]
        'raised by batch 3 of train_loader: inputs uint8 (2, 4) on cpu, targets NoneType'
    """
    try:
        yield
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        exc.add_note(
            f"raised by batch {batch_idx} of {name}: inputs {describe(inputs)}, "
            f"targets {describe(targets)}"
        )
        raise


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


def label_range(batch: Any) -> tuple[int, int] | None:
    """Smallest and largest class label of a batch whose targets are 1-D integers on the CPU.

    Only CPU targets are read, so no device sync is forced; ``None`` for anything else.

    Example:
        >>> label_range((torch.randn(3, 2), torch.tensor([2, 0, 1])))
        (0, 2)
    """
    if not isinstance(batch, tuple | list) or len(batch) != 2:
        return None
    targets = batch[1]
    if (
        not isinstance(targets, torch.Tensor)
        or targets.device.type != "cpu"
        or targets.is_floating_point()
        or targets.dim() != 1
        or targets.numel() == 0
    ):
        return None
    return int(targets.min()), int(targets.max())


def check_labels(labels: tuple[int, int] | None, outputs: Any, name: str, batch_idx: int) -> None:
    """Refuse labels outside ``[0, classes)`` of ``(N, classes)`` outputs: torch would fail deep
    inside the loss, abort the CUDA context, or (for -100) silently ignore the sample.

    Example:
        >>> check_labels((0, 1), torch.zeros(4, 2), "train_loader", 0)  # in range: no error
    """
    if labels is None or not isinstance(outputs, torch.Tensor) or outputs.dim() != 2:
        return
    classes = outputs.shape[1]
    low, high = labels
    if low < 0 or high >= classes:
        raise ValueError(
            f"batch {batch_idx} of {name} holds label {low if low < 0 else high}, but the "
            f"model outputs {classes} classes, so labels must be in [0, {classes}); "
            "check the dataset's labels and the model's num_classes"
        )


def to_device(obj: Any, device: torch.device, channels_last: bool = False) -> Any:
    """Move the tensors of a batch (nested in tuples, lists and dicts) to ``device``; with
    ``channels_last``, 4-D ones in that memory format.

    Example:
        >>> batch = (torch.zeros(2, 3, 4, 4), {"y": torch.zeros(2)})
        >>> batch = to_device(batch, torch.device("cpu"), channels_last=True)
        >>> batch[0].is_contiguous(memory_format=torch.channels_last), batch[1]["y"].shape
        (True, torch.Size([2]))
    """
    if isinstance(obj, torch.Tensor):
        obj = obj.to(device, non_blocking=True)
        if channels_last and obj.dim() == 4:
            obj = obj.contiguous(memory_format=torch.channels_last)
        return obj
    if isinstance(obj, tuple | list):
        return type(obj)(to_device(o, device, channels_last) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device, channels_last) for k, v in obj.items()}
    return obj
