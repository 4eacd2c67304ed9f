"""Exact values of schedules, the training loop's bookkeeping, early stopping, checkpoints,
metering and the classifier helpers, each against a hand-computed expectation."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import slimtorch.train.batchnorm as bn_mod
import slimtorch.train.classifier as classifier_mod
import slimtorch.train.trainer as trainer_mod
from slimtorch.core.errors import CheckpointError
from slimtorch.data.augment import AugmentConfig
from slimtorch.data.dataset import ImageDataset
from slimtorch.train import (
    Callback,
    EarlyStopping,
    Meter,
    TrainConfig,
    Trainer,
    build_optimizer,
    build_scheduler,
    load_checkpoint,
    lr_factor,
    param_groups,
)
from slimtorch.train.batchnorm import recalibrate_batchnorm_
from slimtorch.train.classifier import crop_padding, default_augment, train_classifier
from slimtorch.train.optim import warmup_steps
from slimtorch.train.trainer_state import RECORD_VERSION, _check_same_run, check_not_diverged

Batch = tuple[torch.Tensor, torch.Tensor]


def _blobs(n: int = 16) -> Batch:
    x = torch.randn(n, 4)
    return x, (x[:, 0] > 0).long()


class _Stub:
    """The two trainer attributes EarlyStopping touches."""

    should_stop = False
    epoch = 0


# ---------------------------------------------------------------- optim


def test_cosine_factor_stays_at_zero_past_the_last_step() -> None:
    # progress is clamped at 1: cos(pi) gives 0, not cos(1.2 pi)
    assert lr_factor("cosine", 12, 10, 0) == 0.0


def test_one_dimensional_weights_are_not_decayed() -> None:
    # PReLU's weight is a 1-d parameter that is neither a norm nor called "bias"
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.PReLU())
    groups = param_groups(model, 1e-4)
    assert [(len(g["params"]), g["weight_decay"]) for g in groups] == [(1, 1e-4), (1, 0.0)]


def test_onecycle_without_warmup_peaks_after_30_percent_of_the_steps() -> None:
    cfg = TrainConfig(epochs=1, lr=1.0, schedule="onecycle")
    opt = build_optimizer(nn.Linear(2, 2), cfg)
    sched = build_scheduler(opt, cfg, 100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # OneCycleLR's peak is at step pct_start * total - 1 = 0.3 * 100 - 1
    assert max(range(100), key=lambda i: lrs[i]) == 29
    assert lrs[29] == pytest.approx(1.0)


def test_warmup_steps_round_to_the_nearest_step() -> None:
    # 0.7 * 5 = 3.5 -> 4 (round), not 3 (truncate)
    assert warmup_steps(TrainConfig(epochs=2, warmup_epochs=0.7), 5) == 4


# ---------------------------------------------------------------- trainer


def test_fp16_gradient_clipping_sees_the_unscaled_gradient_norm() -> None:
    x, y = _blobs(32)
    model = nn.Linear(4, 2)
    reference = copy.deepcopy(model)
    nn.functional.cross_entropy(reference(x), y).backward()
    expected = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad) for p in reference.parameters()])
    )
    trainer = Trainer(model, TrainConfig(epochs=1, amp="fp16", grad_clip_norm=1.0, progress=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit([(x, y)])
    assert trainer.scaler is not None
    assert trainer.last_grad_norm is not None
    # the scaled norm would be about 65536 times larger
    assert float(trainer.last_grad_norm) == pytest.approx(float(expected), rel=1e-2)


def test_the_last_epoch_is_evaluated_even_off_the_eval_interval() -> None:
    batch = _blobs()
    cfg = TrainConfig(epochs=3, eval_every_epochs=2, progress=False)
    history = Trainer(nn.Linear(4, 2), cfg).fit([batch], [batch])
    # epoch 2: on the interval; epoch 3: the last one
    assert [v is not None for v in history.val_loss] == [False, True, True]


def test_images_per_second_counts_every_ranks_images(monkeypatch: pytest.MonkeyPatch) -> None:
    # the meter's count is already summed over ranks: a world of 2 must not halve it
    monkeypatch.setattr(trainer_mod, "get_world_size", lambda: 2)
    history = Trainer(nn.Linear(4, 2), TrainConfig(epochs=1, progress=False)).fit([_blobs(16)])
    assert history.images_per_s[0] * history.epoch_time_s[0] == pytest.approx(16.0)


def test_no_step_checkpoint_is_written_at_the_end_of_an_epoch(tmp_path: Path) -> None:
    seen: list[Any] = []

    class Peek(Callback):
        def on_train_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
            p = trainer.checkpoint_path
            seen.append(p is not None and p.exists())

    x, y = _blobs()
    cfg = TrainConfig(epochs=1, checkpoint_every_steps=2, progress=False)
    trainer = Trainer(nn.Linear(4, 2), cfg, out_dir=tmp_path, callbacks=[Peek()])
    # step 2 of 2 ends the epoch: the end-of-epoch checkpoint covers it, not a mid-epoch one
    trainer.fit([(x[:8], y[:8]), (x[8:], y[8:])])
    assert seen == [False]


def test_a_loader_yielding_fewer_batches_than_its_length_is_refused() -> None:
    class Lying:
        def __init__(self, batches: list[Batch]) -> None:
            self.batches = batches

        def __len__(self) -> int:
            return 3

        def __iter__(self) -> Iterator[Batch]:
            return iter(self.batches)

    x, y = _blobs()
    trainer = Trainer(nn.Linear(4, 2), TrainConfig(epochs=1, progress=False))
    with pytest.raises(ValueError, match="train_loader yielded 2 batches"):
        trainer.fit(Lying([(x[:8], y[:8]), (x[8:], y[8:])]))


# ---------------------------------------------------------------- early stopping


def test_early_stopping_counts_an_equal_loss_as_no_improvement() -> None:
    es, t = EarlyStopping(patience=1), _Stub()
    es.on_validation_end(t, {"val_loss": 0.5})
    es.on_validation_end(t, {"val_loss": 0.5})
    assert t.should_stop is True


def test_early_stopping_on_accuracy_needs_a_rise_of_min_delta() -> None:
    es, t = EarlyStopping(monitor="val_accuracy", patience=1, min_delta=0.1), _Stub()
    es.on_validation_end(t, {"val_accuracy": 0.50})
    es.on_validation_end(t, {"val_accuracy": 0.45})
    assert t.should_stop is True and es.best == 0.5


def test_early_stopping_ignores_a_nan_metric() -> None:
    es, t = EarlyStopping(patience=1), _Stub()
    es.on_validation_end(t, {"val_loss": 0.5})
    es.on_validation_end(t, {"val_loss": float("nan")})
    assert es.wait == 0 and t.should_stop is False


# ---------------------------------------------------------------- checkpoint and run state


def test_a_checkpoint_without_a_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    torch.save({"format": "slimtorch.train.checkpoint", "epoch": 1}, path)
    with pytest.raises(CheckpointError, match="version"):
        load_checkpoint(path)


def test_a_nan_loss_with_the_fp16_scale_below_one_is_divergence() -> None:
    trainer = Trainer(nn.Linear(4, 2), TrainConfig(epochs=1, progress=False))
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=0.5)
    with pytest.raises(FloatingPointError, match="diverged"):
        check_not_diverged(trainer, float("nan"))


def test_a_current_record_refuses_a_callback_setting_it_did_not_hold() -> None:
    class Pruner(Callback):
        def run_info(self) -> dict[str, Any]:
            return {"sparsity": 0.5, "schedule": "cubic"}

    trainer = Trainer(nn.Linear(4, 2), TrainConfig(epochs=1, progress=False), callbacks=[Pruner()])
    key = trainer._callback_keys()[0]
    saved = {"callbacks": {key: {"sparsity": 0.5}}, "record_version": RECORD_VERSION}
    # only records older than RECORD_VERSION may lack a key the run now sets
    with pytest.raises(CheckpointError, match="schedule: not set then"):
        _check_same_run(trainer, saved, "ck.pt")


# ---------------------------------------------------------------- labels, meter, batch norm


def test_a_label_equal_to_the_class_count_is_refused() -> None:
    trainer = Trainer(nn.Linear(4, 2), TrainConfig(epochs=1, progress=False))
    with pytest.raises(ValueError, match="holds label 2"):
        trainer.evaluate([(torch.randn(4, 4), torch.full((4,), 2))])


def test_an_empty_meter_has_a_nan_loss() -> None:
    assert math.isnan(Meter(torch.device("cpu")).result()["loss"])


def test_an_empty_batch_leaves_the_mean_loss_alone() -> None:
    meter = Meter(torch.device("cpu"))
    meter.update(torch.zeros(2, 2), torch.tensor(0.5), torch.tensor([0, 1]))
    empty = torch.zeros(0, dtype=torch.long)
    meter.update(torch.zeros(0, 2), torch.tensor(float("nan")), empty)
    assert meter.result()["loss"] == 0.5 and meter.result()["n"] == 2


def test_batchnorm_recalibration_averages_over_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    # two ranks holding identical shards: the sum over ranks is twice this rank's value
    monkeypatch.setattr(bn_mod, "get_world_size", lambda: 2)
    monkeypatch.setattr(bn_mod, "all_reduce_sum", lambda t: t.mul_(2))
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    batches = [(torch.randn(16, 4) * 3 + 1, None) for _ in range(4)]
    with torch.no_grad():
        feats = [net[0](x) for x, _ in batches]
    mean = torch.stack([f.mean(0) for f in feats]).mean(0)
    var = torch.stack([f.var(0, unbiased=True) for f in feats]).mean(0)
    recalibrate_batchnorm_(net, batches)
    torch.testing.assert_close(net[1].running_mean, mean)
    torch.testing.assert_close(net[1].running_var, var)


# ---------------------------------------------------------------- classifier helpers


def test_image_folder_crop_padding_is_an_eighth_of_the_side_rounded() -> None:
    # 12 / 8 = 1.5 -> 2 and 28 / 8 = 3.5 -> 4 (round half to even), not 1 and 3 (floor)
    assert (crop_padding("/some/folder", 12), crop_padding("/some/folder", 28)) == (2, 4)


def test_clothing_is_flipped_and_digits_are_not() -> None:
    assert default_augment("fashion-mnist") == AugmentConfig(random_crop_padding=2, hflip=True)
    augment = default_augment("mnist")
    assert augment is not None and augment.hflip is False


def test_a_global_batch_not_divisible_by_the_ranks_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(classifier_mod, "get_world_size", lambda: 2)
    monkeypatch.setattr(classifier_mod, "get_rank", lambda: 0, raising=False)
    ds = ImageDataset(
        name="t", images=torch.zeros(20, 1, 2, 2, dtype=torch.uint8),
        labels=torch.zeros(20, dtype=torch.long), classes=("a",), mean=(0.0,), std=(1.0,),
    )  # fmt: skip
    with pytest.raises(ValueError, match="divisible"):
        classifier_mod.make_loaders(
            ds, ds, batch_size=5, device=torch.device("cpu"), augment=None, seed=0
        )


def test_val_seed_is_not_recorded_without_a_validation_split(tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=1, progress=False, amp="off")
    train_classifier(
        model="mlp", dataset="digits", out_dir=tmp_path, train_config=cfg,
        batch_size=256, val_seed=5, download=False,
    )  # fmt: skip
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["run"]["val_seed"] is None
