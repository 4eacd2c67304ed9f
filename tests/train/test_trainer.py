"""Trainer: convergence, losses, clipping, callbacks and their order, AMP on CPU, outputs."""

from __future__ import annotations

import io
import json
import math
from typing import Any

import pytest
import torch
from torch import nn

from slimtorch.train import Callback, EarlyStopping, ProgressBar, TrainConfig, Trainer
from train_helpers import ListLoader, make_blobs, make_mlp


def _cfg(**kw: Any) -> TrainConfig:
    base: dict[str, Any] = {"epochs": 1, "lr": 0.1, "amp": "off", "progress": False}
    base.update(kw)
    return TrainConfig(**base)


def test_mlp_learns_separable_blobs(tmp_path: Any) -> None:
    x, y = make_blobs(512, seed=0)
    xv, yv = make_blobs(256, seed=1)
    model = make_mlp()
    cfg = _cfg(epochs=3, lr=0.05, warmup_epochs=0.5)
    trainer = Trainer(model, cfg, out_dir=tmp_path)
    val = ListLoader(xv, yv, 64, shuffle=False)
    loader = ListLoader(x, y, 32)
    history = trainer.fit(loader, val)
    assert history.epoch == [1, 2, 3]
    assert history.train_loss[-1] < 0.5 * history.train_loss[0]
    assert history.val_accuracy[-1] > 0.95
    assert loader.epochs_seen == [0, 1, 2]
    final = trainer.evaluate(val)
    assert final["n"] == 256
    assert final["accuracy"] == pytest.approx(history.val_accuracy[-1])
    # the files beside the run
    saved = json.loads((tmp_path / "history.json").read_text())
    assert saved["val_accuracy"] == history.val_accuracy
    assert TrainConfig.load(tmp_path / "train_config.json") == cfg
    assert (tmp_path / "checkpoint.pt").is_file()
    # cosine schedule ends at 0 after the last step
    assert history.lr[-1] == pytest.approx(0.0, abs=1e-12)


def test_label_smoothing_changes_loss_by_hand_computed_amount() -> None:
    model = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3))
    x = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, -1.0]])
    y = torch.tensor([0, 2])
    loader = [(x, y)]
    eps = 0.1
    plain = Trainer(model, _cfg()).evaluate(loader)["loss"]
    smooth = Trainer(model, _cfg(label_smoothing=eps)).evaluate(loader)["loss"]

    def nll(z: list[float], t: int) -> float:
        log_z = math.log(sum(math.exp(v) for v in z))
        return log_z - z[t]

    def smoothed(z: list[float], t: int) -> float:
        log_z = math.log(sum(math.exp(v) for v in z))
        uniform = sum(log_z - v for v in z) / len(z)
        return (1 - eps) * nll(z, t) + eps * uniform

    z1, z2 = [2.0, 0.0, 0.0], [0.0, 1.0, -1.0]
    assert plain == pytest.approx((nll(z1, 0) + nll(z2, 2)) / 2, rel=1e-6)
    assert smooth == pytest.approx((smoothed(z1, 0) + smoothed(z2, 2)) / 2, rel=1e-6)
    # difference per sample = eps * (mean_k(-log p_k) + log p_t) = eps * (z_t - mean(z)):
    # 0.1 * (2 - 2/3) and 0.1 * (-1 - 0); the batch mean is (2/15 - 1/10) / 2 = 1/60
    assert smooth - plain == pytest.approx(1 / 60, rel=1e-5)


class _GradRecorder(Callback):
    def __init__(self) -> None:
        self.pre: list[torch.Tensor] = []
        self.post: list[torch.Tensor] = []
        self.weights: list[torch.Tensor] = []

    def on_before_optimizer_step(self, trainer: Trainer, optimizer: Any) -> None:
        self.pre.append(trainer.model.weight.grad.detach().clone())
        self.weights.append(trainer.model.weight.detach().clone())

    def on_after_optimizer_step(self, trainer: Trainer) -> None:
        self.post.append(trainer.model.weight.grad.detach().clone())


def test_grad_clipping_bounds_the_norm_and_scales_the_update() -> None:
    model = nn.Linear(4, 3, bias=False)
    x, y = torch.randn(8, 4) * 10, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    rec = _GradRecorder()
    clip, lr = 0.01, 0.5
    cfg = _cfg(lr=lr, momentum=0.0, weight_decay=0.0, schedule="constant", grad_clip_norm=clip)
    trainer = Trainer(model, cfg, callbacks=[rec])
    trainer.fit([(x, y)])
    pre, post = rec.pre[0], rec.post[0]
    assert pre.norm() > 10 * clip
    torch.testing.assert_close(post.norm(), torch.tensor(clip), rtol=1e-5, atol=0)
    torch.testing.assert_close(post, pre * clip / pre.norm(), rtol=1e-5, atol=1e-9)
    assert trainer.last_grad_norm is not None
    torch.testing.assert_close(trainer.last_grad_norm, pre.norm())
    torch.testing.assert_close(model.weight.detach(), rec.weights[0] - lr * post)


class _Recorder(Callback):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def on_fit_start(self, trainer: Trainer) -> None:
        self.calls.append("fit_start")

    def on_fit_end(self, trainer: Trainer) -> None:
        self.calls.append("fit_end")

    def on_train_epoch_start(self, trainer: Trainer) -> None:
        self.calls.append(f"epoch_start{trainer.epoch}")

    def on_train_epoch_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        assert set(metrics) >= {"train_loss", "train_accuracy", "lr", "images_per_s"}
        self.calls.append(f"epoch_end{trainer.epoch}")

    def on_train_batch_start(self, trainer: Trainer, batch: Any, batch_idx: int) -> None:
        self.calls.append(f"batch_start{batch_idx}")

    def on_train_batch_end(self, trainer: Trainer, outputs: Any, loss: Any, batch_idx: int) -> None:
        assert not loss.requires_grad
        self.calls.append(f"batch_end{batch_idx}")

    def on_before_backward(self, trainer: Trainer, loss: torch.Tensor) -> None:
        assert loss.requires_grad
        self.calls.append("before_backward")

    def on_after_backward(self, trainer: Trainer) -> None:
        self.calls.append("after_backward")

    def on_before_optimizer_step(self, trainer: Trainer, optimizer: Any) -> None:
        assert optimizer is trainer.optimizer
        self.calls.append("before_step")

    def on_after_optimizer_step(self, trainer: Trainer) -> None:
        self.calls.append("after_step")

    def on_validation_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        assert set(metrics) == {"val_loss", "val_accuracy", "val_n"}
        self.calls.append("validation_end")

    def compute_loss(self, trainer: Trainer, inputs: Any, outputs: Any, targets: Any, loss: Any):
        self.calls.append("compute_loss")
        return loss


def test_callback_hooks_run_in_documented_order() -> None:
    x, y = make_blobs(8)
    rec = _Recorder()
    Trainer(make_mlp(), _cfg(epochs=2), callbacks=[rec]).fit(
        ListLoader(x, y, 4), ListLoader(x, y, 8, shuffle=False)
    )
    step = ["compute_loss", "before_backward", "after_backward", "before_step", "after_step"]
    epoch = lambda e: [  # noqa: E731
        f"epoch_start{e}",
        "batch_start0",
        *step,
        "batch_end0",
        "batch_start1",
        *step,
        "batch_end1",
        f"epoch_end{e}",
        "validation_end",
    ]
    assert rec.calls == ["fit_start", *epoch(0), *epoch(1), "fit_end"]


class _AddTerms(Callback):
    """Adds a constant (shows in the reported loss) and 0.5 * ||W||^2 (shows in the update)."""

    def compute_loss(self, trainer: Trainer, inputs: Any, outputs: Any, targets: Any, loss: Any):
        return loss + 10.0 + 0.5 * trainer.model.weight.pow(2).sum()


def test_compute_loss_from_a_callback_is_optimised_and_reported() -> None:
    model = nn.Linear(4, 3, bias=False)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    w0 = model.weight.detach().clone()
    w = w0.clone().requires_grad_(True)
    ce = nn.functional.cross_entropy(x @ w.T, y)
    (grad_ce,) = torch.autograd.grad(ce, w)
    lr = 0.1
    cfg = _cfg(lr=lr, momentum=0.0, weight_decay=0.0, schedule="constant")
    history = Trainer(model, cfg, callbacks=[_AddTerms()]).fit([(x, y)])
    expected_loss = ce.item() + 10.0 + 0.5 * w0.pow(2).sum().item()
    assert history.train_loss[0] == pytest.approx(expected_loss, rel=1e-6)
    torch.testing.assert_close(model.weight.detach(), w0 - lr * (grad_ce + w0))


class _DtypeSpy(Callback):
    def __init__(self) -> None:
        self.dtypes: list[torch.dtype] = []

    def on_train_batch_end(self, trainer: Trainer, outputs: Any, loss: Any, batch_idx: int) -> None:
        self.dtypes.append(outputs.dtype)


@pytest.mark.parametrize(("amp", "dtype", "scaled"), [("bf16", torch.bfloat16, False)])
def test_bf16_autocast_runs_on_cpu(amp: str, dtype: torch.dtype, scaled: bool) -> None:
    x, y = make_blobs(64)
    spy = _DtypeSpy()
    model = make_mlp()
    trainer = Trainer(model, _cfg(amp=amp, lr=0.05), callbacks=[spy])
    history = trainer.fit(ListLoader(x, y, 16))
    assert spy.dtypes == [dtype] * 4
    assert (trainer.scaler is not None) == scaled
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert math.isfinite(history.train_loss[0])


def test_auto_amp_is_off_on_cpu() -> None:
    spy = _DtypeSpy()
    x, y = make_blobs(16)
    trainer = Trainer(make_mlp(), _cfg(amp="auto"), callbacks=[spy])
    trainer.fit(ListLoader(x, y, 16))
    assert spy.dtypes == [torch.float32]
    assert trainer.amp is not None and trainer.amp.name == "off"


class _StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: Trainer, outputs: Any, loss: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


def test_should_stop_ends_training_after_the_current_batch() -> None:
    x, y = make_blobs(64)
    trainer = Trainer(make_mlp(), _cfg(epochs=5), callbacks=[_StopAt(6)])
    history = trainer.fit(ListLoader(x, y, 16))
    assert trainer.global_step == 6
    assert history.epoch == [1, 2]


def test_early_stopping_stops_when_the_metric_stalls() -> None:
    x, y = make_blobs(32)
    stopper = EarlyStopping("val_loss", patience=2)
    # lr so small the loss cannot improve by min_delta: stops after 1 + patience validations
    cfg = _cfg(epochs=10, lr=1e-9, schedule="constant")
    stopper.min_delta = 1.0
    history = Trainer(make_mlp(), cfg, callbacks=[stopper]).fit(
        ListLoader(x, y, 16), ListLoader(x, y, 16, shuffle=False)
    )
    assert history.epoch == [1, 2, 3]
    assert stopper.stopped_epoch == 3 and stopper.wait == 2  # numbered as the history
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=0)


def test_early_stopping_without_validation_says_it_could_not_act(
    caplog: pytest.LogCaptureFixture,
) -> None:
    x, y = make_blobs(32)
    for cfg, val in ((_cfg(epochs=2), None), (_cfg(epochs=2, eval_every_epochs=0), True)):
        caplog.clear()
        stopper = EarlyStopping("val_loss")
        loaders = [ListLoader(x, y, 16)] + ([ListLoader(x, y, 16)] if val else [])
        with caplog.at_level("WARNING", logger="slimtorch.train.callbacks"):
            assert Trainer(make_mlp(), cfg, callbacks=[stopper]).fit(*loaders).epoch == [1, 2]
        assert "EarlyStopping never saw a finite val_loss value" in caplog.text


def test_progress_option_adds_a_bar_that_writes_lines(capsys: pytest.CaptureFixture[str]) -> None:
    x, y = make_blobs(64)
    trainer = Trainer(make_mlp(), _cfg(progress=True, log_every_steps=2))
    trainer.fit(ListLoader(x, y, 16))
    assert sum(isinstance(c, ProgressBar) for c in trainer.callbacks) == 1
    err = capsys.readouterr().err
    assert "epoch 1/1 step 2/4" in err and "epoch 1/1 step 4/4" in err
    assert "epoch 1/1 step 1/4" not in err


def test_the_epoch_line_is_logged_once_whether_or_not_a_bar_shows_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # with a progress bar the epoch's figures were printed twice: by the bar (in %) and in an
    # INFO line (as fractions)
    x, y = make_blobs(64)
    for progress, expected in ((True, 0), (False, 1)):
        caplog.clear()
        with caplog.at_level("INFO", logger="slimtorch.train.trainer"):
            Trainer(make_mlp(), _cfg(progress=progress)).fit(ListLoader(x, y, 16))
        lines = [r for r in caplog.records if r.getMessage().startswith("epoch 1/1:")]
        assert len(lines) == expected, progress


def test_bad_loaders_and_batches_raise() -> None:
    trainer = Trainer(make_mlp(), _cfg())
    with pytest.raises(TypeError, match="__len__"):
        trainer.fit(iter([(torch.zeros(1, 8), torch.zeros(1))]))
    with pytest.raises(ValueError, match="empty"):
        trainer.fit([])
    with pytest.raises(TypeError, match=r"\(inputs, targets\) pair"):
        trainer.fit([(torch.zeros(2, 8),)])
    with pytest.raises(TypeError, match="TrainConfig"):
        Trainer(make_mlp(), {"epochs": 1})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="out_dir"):
        Trainer(make_mlp(), _cfg()).fit([(torch.zeros(2, 8), torch.zeros(2).long())], resume=True)


def test_custom_loss_fn_without_accuracy() -> None:
    model = nn.Linear(2, 1)
    x = torch.randn(32, 2)
    y = x @ torch.tensor([[1.5], [-2.0]]) + 0.5
    cfg = _cfg(epochs=20, lr=0.2, momentum=0.0, weight_decay=0.0, schedule="constant")
    trainer = Trainer(model, cfg, loss_fn=nn.MSELoss())
    history = trainer.fit([(x[:16], y[:16]), (x[16:], y[16:])])
    assert history.train_accuracy == [None] * 20
    assert history.train_loss[-1] < 1e-3 * history.train_loss[0]
    assert trainer.evaluate([(x, y)])["accuracy"] is None


def test_progress_bar_redraws_on_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Tty()
    x, y = make_blobs(32)
    Trainer(make_mlp(), _cfg(), callbacks=[ProgressBar(stream, refresh_s=0.0, width=4)]).fit(
        ListLoader(x, y, 16)
    )
    out = stream.getvalue()
    assert "\r\x1b[Kepoch 1/1 [##..] 1/2" in out
    assert "[####] 2/2" in out
    assert "epoch 1/1 done" in out


def _bn_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


def test_fit_keeps_a_batch_norm_frozen_before_it_in_eval_mode() -> None:
    """A batch norm put in eval mode inside a training model (frozen for a small-batch
    fine-tune) keeps its running statistics through every epoch and its validation."""
    x, y = make_blobs(128, seed=0)
    model = _bn_mlp()
    model[1].eval()
    before = model[1].running_mean.clone()
    val = ListLoader(x[:32], y[:32], 32, shuffle=False)
    Trainer(model, _cfg(epochs=2)).fit(ListLoader(x, y, 32), val)
    assert torch.equal(model[1].running_mean, before)
    assert not model[1].training and model.training and model[0].training


def test_fit_trains_a_model_in_eval_mode_whole() -> None:
    """A model handed over in eval mode (as load_model returns it) trains every module."""
    x, y = make_blobs(128, seed=0)
    model = _bn_mlp().eval()
    before = model[1].running_mean.clone()
    Trainer(model, _cfg(epochs=1)).fit(ListLoader(x, y, 32))
    assert not torch.equal(model[1].running_mean, before)
    assert all(m.training for m in model.modules())


def test_a_log_record_after_a_drawn_bar_starts_on_its_own_line() -> None:
    # on a terminal the CLI's log lines were glued to the end of the progress bar's line
    import logging

    from slimtorch.cli.main import _AfterProgress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    bar = ProgressBar(stream=out)  # (held, as the trainer's callbacks hold it)
    bar._write("epoch 1/1 [###.....]", redraw=True)
    record = logging.LogRecord("slimtorch.x", logging.INFO, __file__, 1, "pruned", None, None)
    _AfterProgress(out).emit(record)
    assert out.getvalue() == "\r\x1b[Kepoch 1/1 [###.....]\npruned\n"
