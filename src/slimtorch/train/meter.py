"""Running loss/accuracy sums over an epoch, kept on the device and summed across ranks.

The sums stay on the device so a training step never waits for the GPU; they are read only when
a progress line is drawn or the epoch ends. Accuracy is counted for classification outputs only:
2-D logits ``(B, C)`` with integer class targets ``(B,)``.

Example:
    >>> meter = Meter(torch.device("cpu"))
    >>> logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    >>> meter.update(logits, torch.tensor(0.5), torch.tensor([0, 0]))
    >>> meter.result()
    {'loss': 0.5, 'accuracy': 0.5, 'n': 2}
"""

from __future__ import annotations

import time
from typing import Any

import torch

from slimtorch.train.distributed import all_reduce_sum


def _sum_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def batch_size_of(targets: Any) -> int:
    """Number of samples in a batch, from its targets (first dimension).

    Example:
        >>> batch_size_of(torch.zeros(8))
        8
    """
    if isinstance(targets, torch.Tensor):
        return int(targets.shape[0]) if targets.dim() > 0 else 1
    if isinstance(targets, list | tuple) and targets:
        return batch_size_of(targets[0])
    if isinstance(targets, dict) and targets:
        return batch_size_of(next(iter(targets.values())))
    raise TypeError(
        f"cannot tell the batch size from targets of type {type(targets).__name__}; expected a "
        "tensor (or a list/tuple/dict of tensors) whose first dimension is the batch"
    )


class Meter:
    """Sums of ``loss * batch_size``, correct predictions and sample counts.

    Args:
        device: Where the sums live (the training device).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        """Zero the sums and restart the clock."""
        dtype = _sum_dtype(self.device)
        self.loss_sum = torch.zeros((), dtype=dtype, device=self.device)
        self.correct = torch.zeros((), dtype=dtype, device=self.device)
        self.n = 0
        self.n_acc = 0
        self.first_bad = torch.full((), -1.0, dtype=dtype, device=self.device)
        self.elapsed_before = 0.0
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since :meth:`reset` plus any time restored from a checkpoint."""
        return self.elapsed_before + time.perf_counter() - self.t0

    def update(
        self, outputs: Any, loss: torch.Tensor, targets: Any, batch_idx: int | None = None
    ) -> None:
        """Add one batch (``loss`` is the batch mean); an empty batch is ignored. With
        ``batch_idx``, the first batch whose loss is not finite is remembered on the device
        (no synchronisation; see :meth:`first_nonfinite_batch`).

        Example:
            >>> meter = Meter(torch.device("cpu"))
            >>> logits, labels = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
            >>> meter.update(logits, torch.tensor(0.25), labels)
            >>> meter.n, meter.n_acc, meter.correct.item()
            (2, 2, 2.0)
        """
        bs = batch_size_of(targets)
        if bs == 0:
            return  # an empty batch adds nothing (its mean loss is NaN)
        self.loss_sum += loss.detach().to(self.loss_sum.dtype) * bs
        self.n += bs
        if batch_idx is not None:
            first = (self.first_bad < 0) & ~torch.isfinite(loss.detach())
            self.first_bad = torch.where(first, float(batch_idx), self.first_bad)
        if (
            isinstance(outputs, torch.Tensor)
            and isinstance(targets, torch.Tensor)
            and outputs.dim() == 2
            and targets.dim() == 1
            and not targets.is_floating_point()
            and outputs.shape[0] == targets.shape[0]
        ):
            hits = (outputs.detach().argmax(dim=1) == targets).sum()
            self.correct += hits.to(self.correct.dtype)
            self.n_acc += bs

    def first_nonfinite_batch(self) -> int | None:
        """Index of the first batch since :meth:`reset` whose loss was NaN or infinite (this
        rank's; None: none was).

        Example:
            >>> meter = Meter(torch.device("cpu"))
            >>> for i, v in enumerate([0.5, float("nan"), 0.4]):
            ...     meter.update(torch.zeros(2, 1), torch.tensor(v), torch.zeros(2, 1), i)
            >>> meter.first_nonfinite_batch()
            1
        """
        value = int(self.first_bad.item())
        return None if value < 0 else value

    def _sums(self, reduce: bool) -> tuple[float, float, float, float]:
        dtype = self.loss_sum.dtype
        counts = torch.tensor([float(self.n), float(self.n_acc)], dtype=dtype, device=self.device)
        sums = torch.cat([self.loss_sum.view(1), self.correct.view(1), counts])
        if reduce:
            all_reduce_sum(sums)
        loss_sum, correct, n, n_acc = (float(v) for v in sums.tolist())
        return loss_sum, correct, n, n_acc

    def result(self, reduce: bool = True) -> dict[str, Any]:
        """Mean loss, accuracy (``None`` when not counted) and sample count.

        Args:
            reduce: Sum over all ranks first (every rank must call it then).

        Example:
            >>> meter = Meter(torch.device("cpu"))
            >>> meter.update(torch.zeros(4, 1), torch.tensor(0.5), torch.zeros(4, 1))  # regression
            >>> meter.result()
            {'loss': 0.5, 'accuracy': None, 'n': 4}
        """
        loss_sum, correct, n, n_acc = self._sums(reduce)
        return {
            "loss": loss_sum / n if n else float("nan"),
            "accuracy": correct / n_acc if n_acc else None,
            "n": round(n),
        }

    def state_dict(self, reduce: bool = False) -> dict[str, Any]:
        """Sums and elapsed time as plain numbers (optionally summed over ranks).

        Example:
            >>> meter = Meter(torch.device("cpu"))
            >>> meter.update(torch.tensor([[2.0, 0.0]]), torch.tensor(0.5), torch.tensor([0]))
            >>> state = meter.state_dict()
            >>> {k: state[k] for k in ("loss_sum", "correct", "n", "n_acc")}
            {'loss_sum': 0.5, 'correct': 1.0, 'n': 1, 'n_acc': 1}
        """
        loss_sum, correct, n, n_acc = self._sums(reduce)
        return {
            "loss_sum": loss_sum,
            "correct": correct,
            "n": round(n),
            "n_acc": round(n_acc),
            "elapsed_s": self.elapsed(),
        }

    def load_state_dict(self, state: dict[str, Any], counts: bool = True) -> None:
        """Restore :meth:`state_dict` output; ``counts=False`` restores only the clock.

        Example:
            >>> meter = Meter(torch.device("cpu"))
            >>> meter.update(torch.tensor([[2.0, 0.0]]), torch.tensor(0.5), torch.tensor([0]))
            >>> restored = Meter(torch.device("cpu"))
            >>> restored.load_state_dict(meter.state_dict())
            >>> restored.result()
            {'loss': 0.5, 'accuracy': 1.0, 'n': 1}
        """
        self.reset()
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        if counts:
            self.loss_sum.fill_(float(state["loss_sum"]))
            self.correct.fill_(float(state["correct"]))
            self.n = int(state["n"])
            self.n_acc = int(state["n_acc"])
