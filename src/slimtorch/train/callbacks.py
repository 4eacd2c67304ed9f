"""Training callbacks: the hooks every training-time method plugs into.

QAT, pruning masks, dynamic sparsity and distillation all run inside
the one :class:`~slimtorch.train.Trainer` by overriding some of these no-op hooks. The hook names
follow PyTorch Lightning. Order within one :meth:`Trainer.fit`::

    setup                                  # model not yet moved/wrapped, checkpoint not loaded
    on_fit_start
    per epoch:
        on_train_epoch_start
        per batch:
            on_train_batch_start(batch, batch_idx)
            compute_loss(inputs, outputs, targets, loss) -> loss   # each callback in turn
            on_before_backward(loss)
            on_after_backward
            on_before_optimizer_step(optimizer)   # grads unscaled, not yet clipped
            on_after_optimizer_step               # e.g. re-apply pruning masks
            on_train_batch_end(outputs, loss, batch_idx)
        on_train_epoch_end(metrics)               # train metrics of the epoch
        on_validation_end(metrics)                # when the epoch is validated
    teardown                                      # also when an epoch raised
    on_fit_end

Callbacks run in the order they were given. A callback stops training by setting
``trainer.should_stop = True`` (honoured after the current batch on one process, at the end of
the epoch under DDP). Its :meth:`Callback.state_dict` is saved in the checkpoint and handed back to
:meth:`Callback.load_state_dict` on resume; keep it to tensors, dicts, lists, numbers and strings.

Example:
    >>> class RecordLR(Callback):
    ...     def __init__(self):
    ...         self.seen = []
    ...     def on_train_epoch_end(self, trainer, metrics):
    ...         self.seen.append((trainer.epoch + 1, round(metrics["lr"], 4)))
    >>> loader = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(2)]
    >>> cfg = TrainConfig(epochs=2, lr=0.1, progress=False)  # cosine schedule over 4 steps
    >>> record = RecordLR()
    >>> _ = Trainer(nn.Linear(4, 2), cfg, callbacks=[record]).fit(loader)
    >>> record.seen
    [(1, 0.05), (2, 0.0)]
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from slimtorch.train.trainer import Trainer

logger = logging.getLogger(__name__)


class Callback:
    """Base class of training callbacks; every hook is a no-op (see the module docstring)."""

    @property
    def state_key(self) -> str:
        """Key of this callback's state in the checkpoint (class name by default)."""
        return type(self).__qualname__

    def run_info(self) -> dict[str, Any] | None:
        """What this callback changes about the run, as JSON values: saved in the checkpoint,
        and a resume with other values is refused. Default: its ``config`` (a slimtorch
        ``Config``) if it has one, else None (progress, logging: nothing to compare)."""
        to_dict = getattr(getattr(self, "config", None), "to_dict", None)
        return None if to_dict is None else {"config": to_dict()}

    def setup(self, trainer: Trainer) -> None:
        """Before the model is moved, wrapped for DDP and a checkpoint is resumed.

        Add buffers or submodules the checkpoint will hold here (e.g. sparsity masks), so
        resuming finds them and DDP broadcasts them.
        """

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first epoch (after the model, optimiser and checkpoint are set up)."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """After the last epoch (or after stopping early)."""

    def teardown(self, trainer: Trainer) -> None:
        """When ``fit`` leaves its epochs, whether they ended or raised (before
        ``on_fit_end``, which a failed run does not reach): release what ``on_fit_start`` set
        up outside the callback (hooks on the model). It should not raise."""

    def on_train_epoch_start(self, trainer: Trainer) -> None:
        """At the start of epoch ``trainer.epoch`` (0-based)."""

    def on_train_epoch_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        """After the last batch of an epoch; ``metrics`` holds ``train_loss``,
        ``train_accuracy``, ``lr``, ``images_per_s``, ``epoch_time_s``."""

    def on_train_batch_start(self, trainer: Trainer, batch: Any, batch_idx: int) -> None:
        """Before the forward pass; ``batch`` is already on the device."""

    def on_train_batch_end(
        self, trainer: Trainer, outputs: torch.Tensor, loss: torch.Tensor, batch_idx: int
    ) -> None:
        """After the optimiser and scheduler steps; ``loss`` is detached."""

    def on_before_backward(self, trainer: Trainer, loss: torch.Tensor) -> None:
        """Right before ``loss.backward()`` (``loss`` is the final, unscaled loss)."""

    def on_after_backward(self, trainer: Trainer) -> None:
        """Right after the backward pass (gradients may still be scaled under fp16)."""

    def on_before_optimizer_step(self, trainer: Trainer, optimizer: torch.optim.Optimizer) -> None:
        """Before clipping and ``optimizer.step()``; gradients are unscaled."""

    def on_after_optimizer_step(self, trainer: Trainer) -> None:
        """Right after ``optimizer.step()``, before the scheduler step."""

    def on_validation_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        """After validation; ``metrics`` holds ``val_loss``, ``val_accuracy``, ``val_n``."""

    def compute_loss(
        self,
        trainer: Trainer,
        inputs: Any,
        outputs: torch.Tensor,
        targets: Any,
        loss: torch.Tensor,
    ) -> torch.Tensor:
        """Return the training loss, possibly with extra terms (distillation, regularisers).

        Called inside autocast, after the loss function, each callback getting the previous
        one's result.
        """
        return loss

    def state_dict(self) -> dict[str, Any]:
        """State to save in the checkpoint (checkpoint-safe types only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class EarlyStopping(Callback):
    """Stop when a validation metric has not improved for ``patience`` validations.

    Args:
        monitor: A key of the validation metrics: ``"val_loss"`` or ``"val_accuracy"``.
        mode: ``"min"`` or ``"max"``; ``None`` picks ``"max"`` for accuracy, else ``"min"``.
        patience: Validations without improvement before stopping (>= 1).
        min_delta: The least change that counts as an improvement (>= 0).

    Example:
        >>> EarlyStopping("val_accuracy").mode  # picked from the metric's name
        'max'
        >>> loader = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(2)]
        >>> stop = EarlyStopping("val_loss", patience=2, min_delta=0.1)
        >>> cfg = TrainConfig(epochs=10, lr=1e-6, progress=False)  # too small a step to improve
        >>> Trainer(nn.Linear(4, 2), cfg, callbacks=[stop]).fit(loader, loader).epoch
        [1, 2, 3]
        >>> stop.stopped_epoch, stop.wait  # the history's epoch numbers
        (3, 2)
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        mode: str | None = None,
        patience: int = 3,
        min_delta: float = 0.0,
    ) -> None:
        if mode is None:
            mode = "max" if "acc" in monitor else "min"
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping.mode must be 'min' or 'max', got {mode!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"EarlyStopping.patience must be an integer >= 1, got {patience!r}")
        if min_delta < 0:
            raise ValueError(f"EarlyStopping.min_delta must be >= 0, got {min_delta!r}")
        self.monitor = monitor
        self.mode = mode
        self.patience = patience
        self.min_delta = float(min_delta)
        self.best: float | None = None
        self.wait = 0
        self.stopped_epoch: int | None = None

    def _improved(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def on_validation_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if self.monitor not in metrics:
            raise ValueError(
                f"EarlyStopping monitors {self.monitor!r} but the validation metrics are "
                f"{sorted(metrics)}; pick one of those"
            )
        value = metrics[self.monitor]
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return
        value = float(value)
        if self._improved(value):
            self.best = value
            self.wait = 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            trainer.should_stop = True
            self.stopped_epoch = trainer.epoch + 1  # 1-based, as in the history and the logs
            logger.info(
                "early stopping at epoch %d: %s has not improved on %.6g for %d validations",
                self.stopped_epoch,
                self.monitor,
                self.best,
                self.wait,
            )

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.best is None:
            logger.warning("EarlyStopping never saw a finite %s value, so it could not stop "
                           "the run: pass fit() a val_loader and keep eval_every_epochs >= 1 "
                           "(or the metric was NaN throughout)", self.monitor)  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait, "stopped_epoch": self.stopped_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state.get("best")
        self.wait = int(state.get("wait", 0))
        self.stopped_epoch = state.get("stopped_epoch")
