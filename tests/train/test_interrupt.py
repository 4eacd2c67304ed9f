"""SIGINT/SIGTERM during fit: the step ends, a resumable checkpoint is written, then it stops."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from slimtorch.train import Callback, TrainConfig, Trainer, TrainingInterrupted, load_checkpoint
from train_helpers import ListLoader, make_blobs, make_mlp

X, Y = make_blobs(64, seed=3)  # 8 steps per epoch at batch 8
pytestmark = pytest.mark.usefixtures("python_sigint")


class _SignalAt(Callback):
    """Sends ``signals`` to this process at the end of global step ``step``."""

    def __init__(self, step: int, *signals: int) -> None:
        self.step, self.signals = step, signals

    def on_train_batch_end(self, trainer: Trainer, outputs: Any, loss: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            for sig in self.signals:
                signal.raise_signal(sig)  # (os.kill would terminate the process on Windows)


def _fit(out: Path, callbacks: list[Callback], resume: bool = False) -> Trainer:
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=3, lr=0.05, amp="off", seed=7, progress=False)
    trainer = Trainer(make_mlp(), cfg, callbacks=callbacks, out_dir=out)
    trainer.fit(ListLoader(X, Y, 8), resume=resume)
    return trainer


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_epoch_stops_after_the_step_and_resumes_to_the_same_weights(
    tmp_path: Path, sig: int
) -> None:
    # SIGTERM killed the run with no checkpoint; SIGINT lost every step since the last epoch
    ref = _fit(tmp_path / "ref", [])
    with pytest.raises(TrainingInterrupted, match=r"stopped by SIG\w+ after step 11; checkpoint"):
        _fit(tmp_path / "run", [_SignalAt(11, sig)])
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert (saved["epoch"], saved["step_in_epoch"], saved["global_step"]) == (1, 3, 11)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers given back
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    resumed = _fit(tmp_path / "run", [], resume=True)
    assert resumed.global_step == 24
    for a, b in zip(ref.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_signal_on_an_epochs_last_step_stops_after_the_epoch(tmp_path: Path) -> None:
    with pytest.raises(TrainingInterrupted, match="after step 8"):
        _fit(tmp_path / "run", [_SignalAt(8, signal.SIGTERM)])
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert (saved["epoch"], saved["step_in_epoch"]) == (1, 0)
    assert len(saved["history"]["epoch"]) == 1  # the epoch was finished and recorded


def test_a_second_signal_stops_at_once(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt) as info:
        _fit(tmp_path / "run", [_SignalAt(3, signal.SIGTERM, signal.SIGINT)])
    assert not isinstance(info.value, TrainingInterrupted)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_callers_own_handler_is_left_alone(tmp_path: Path) -> None:
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        trainer = _fit(tmp_path / "run", [_SignalAt(3, signal.SIGTERM)])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == [signal.SIGTERM] and trainer.global_step == 24


def test_an_ignored_sigint_stays_ignored() -> None:
    # a run started as a background job (SIGINT ignored) must not start reacting to it
    from slimtorch.train.interrupt import stop_requests

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # python_sigint puts Python's handler back
    with stop_requests(enabled=True) as request:
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # SIGTERM is still taken
        signal.raise_signal(signal.SIGINT)
    assert request.signum is None
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
