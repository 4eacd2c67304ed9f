"""Stopping a training run cleanly on Ctrl-C (SIGINT) or a scheduler's SIGTERM.

While :meth:`~slimtorch.train.Trainer.fit` runs in the main thread of a single process, the two
signals no longer stop it wherever it happens to be (SIGTERM killed it outright, with no
checkpoint; SIGINT lost every step since the last one): the current optimiser step finishes, a
resumable checkpoint is written (mid-epoch ones resume exactly), and the fit raises
:class:`TrainingInterrupted` (a ``KeyboardInterrupt``). A second signal stops at once. Handlers
the caller installed are left alone, and data-parallel runs keep the default behaviour (every
rank would have to agree on the step to stop at).

Example:
    >>> with stop_requests(enabled=True) as stop:
    ...     stop.signum is None
    True
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger(__name__)


class TrainingInterrupted(KeyboardInterrupt):
    """A fit stopped by SIGINT/SIGTERM after a step, its checkpoint written (if it keeps one);
    ``summary`` says so without the Python hint of the message (a command line gives its own)."""

    def __init__(self, summary: str, hint: str = "") -> None:
        super().__init__(summary + hint)
        self.summary = summary


class StopRequest:
    """The signal that asked the run to stop (None: none yet)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def name(self) -> str:
        return "a stop request" if self.signum is None else signal.Signals(self.signum).name


_DEFAULTS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}


@contextlib.contextmanager
def stop_requests(enabled: bool) -> Iterator[StopRequest]:
    """While the block runs, SIGINT and SIGTERM (where they still have Python's default
    handlers, and in the main thread only) set the yielded request's ``signum`` instead of
    stopping the process; a second one raises ``KeyboardInterrupt`` at once."""
    request = StopRequest()
    installed: dict[signal.Signals, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        if request.signum is not None:
            raise KeyboardInterrupt
        request.signum = signum
        logger.warning(
            "%s: stopping after this step and writing a checkpoint if the run keeps one; send "
            "it again to stop at once", signal.Signals(signum).name,
        )  # fmt: skip

    if enabled and threading.current_thread() is threading.main_thread():
        for sig, default in _DEFAULTS.items():
            if signal.getsignal(sig) is default:
                installed[sig] = default
                signal.signal(sig, handler)
    try:
        yield request
    finally:
        for sig, default in installed.items():
            signal.signal(sig, default)


def interrupted(request: StopRequest, checkpoint: Any, step: int) -> TrainingInterrupted:
    """The error a fit stopped by ``request`` after global step ``step`` raises (``checkpoint``:
    the path written, or None when the run keeps none)."""
    if checkpoint is None:
        return TrainingInterrupted(
            f"stopped by {request.name} after step {step}; the run keeps no checkpoint (no out_dir)"
        )
    return TrainingInterrupted(
        f"stopped by {request.name} after step {step}; checkpoint {checkpoint} written",
        " (Trainer.fit(..., resume=True) continues it)",
    )
