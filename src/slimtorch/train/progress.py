"""A small progress bar on stderr: epoch, step/total, loss, accuracy, images/s.

On a terminal the line is redrawn in place at most every ``refresh_s`` seconds; otherwise (logs,
CI) a plain line is written every ``log_every_steps`` steps of the trainer config and at the end
of each epoch. Only rank 0 writes.

Example:
    >>> import sys
    >>> loader = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(2)]
    >>> cfg = TrainConfig(epochs=1, log_every_steps=2, progress=False)
    >>> bar = ProgressBar(stream=sys.stdout)  # stderr by default
    >>> _ = Trainer(nn.Linear(4, 2), cfg, callbacks=[bar]).fit(loader)
    epoch 1/1 step 2/2  loss ...  acc ...%  ... img/s
    epoch 1/1 done  loss ...  acc ...%  ... img/s  ... s
"""

from __future__ import annotations

import sys
import time
import weakref
from typing import IO, TYPE_CHECKING, Any

import torch

from slimtorch.train.callbacks import Callback
from slimtorch.train.distributed import is_main_process

if TYPE_CHECKING:
    from slimtorch.train.trainer import Trainer


def _fmt_acc(acc: float | None) -> str:
    return "-" if acc is None else f"{100.0 * acc:.2f}%"


_OPEN: weakref.WeakSet[ProgressBar] = weakref.WeakSet()
"""Bars that may have a line open on their terminal."""


def end_progress_line() -> None:
    """End the line a terminal progress bar is drawing, so that the next write (a log record)
    starts on a line of its own instead of being glued to the bar.

    Example:
        >>> end_progress_line()  # nothing drawn: nothing written
    """
    for bar in list(_OPEN):
        if bar._drawn:
            bar._drawn = False
            out = bar._out()
            out.write("\n")
            out.flush()
    _OPEN.clear()


class ProgressBar(Callback):
    """Report training progress on ``stream`` (stderr by default).

    Args:
        stream: Where to write; ``None`` means ``sys.stderr`` at the time of writing.
        refresh_s: Least time between redraws on a terminal.
        width: Width of the bar in characters (terminal mode).

    Example:
        >>> bar = ProgressBar(refresh_s=0.5)
    """

    def __init__(
        self, stream: IO[str] | None = None, refresh_s: float = 0.1, width: int = 24
    ) -> None:
        self.stream = stream
        self.refresh_s = float(refresh_s)
        self.width = int(width)
        self._last_draw = 0.0
        self._drawn = False

    def _out(self) -> IO[str]:
        return self.stream if self.stream is not None else sys.stderr

    def _is_tty(self) -> bool:
        isatty = getattr(self._out(), "isatty", None)
        return bool(isatty and isatty())

    def _line(self, trainer: Trainer) -> str:
        m = trainer.running_metrics()
        total = trainer.steps_per_epoch
        done = trainer.step_in_epoch
        head = f"epoch {trainer.epoch + 1}/{trainer.config.epochs}"
        steps = f"{done:>{len(str(total))}}/{total}"
        tail = f"loss {m['loss']:.4f}  acc {_fmt_acc(m['accuracy'])}  {m['images_per_s']:.0f} img/s"
        if self._is_tty():
            filled = int(self.width * done / max(1, total))
            bar = "#" * filled + "." * (self.width - filled)
            return f"{head} [{bar}] {steps}  {tail}"
        return f"{head} step {steps}  {tail}"

    def _write(self, text: str, *, redraw: bool) -> None:
        out = self._out()
        if redraw:
            out.write("\r\x1b[K" + text)
            self._drawn = True
            _OPEN.add(self)
        else:
            if self._drawn:
                out.write("\n")
                self._drawn = False
            out.write(text + "\n")
        out.flush()

    def on_train_epoch_start(self, trainer: Trainer) -> None:
        self._last_draw = 0.0

    def on_train_batch_end(
        self, trainer: Trainer, outputs: torch.Tensor, loss: torch.Tensor, batch_idx: int
    ) -> None:
        if not is_main_process():
            return
        if self._is_tty():
            now = time.perf_counter()
            if now - self._last_draw >= self.refresh_s:
                self._last_draw = now
                self._write(self._line(trainer), redraw=True)
        elif trainer.global_step % trainer.config.log_every_steps == 0:
            self._write(self._line(trainer), redraw=False)

    def on_train_epoch_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if not is_main_process():
            return
        line = (
            f"epoch {trainer.epoch + 1}/{trainer.config.epochs} done  "
            f"loss {metrics['train_loss']:.4f}  acc {_fmt_acc(metrics['train_accuracy'])}  "
            f"{metrics['images_per_s']:.0f} img/s  {metrics['epoch_time_s']:.1f} s"
        )
        self._write(line, redraw=False)

    def on_validation_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if not is_main_process():
            return
        self._write(
            f"epoch {trainer.epoch + 1}/{trainer.config.epochs} {trainer.eval_name}  "
            f"loss {metrics['val_loss']:.4f}  acc {_fmt_acc(metrics['val_accuracy'])}",
            redraw=False,
        )
