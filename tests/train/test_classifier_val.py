"""train_classifier's held-out validation split: per-epoch figures on it, test kept apart."""

from __future__ import annotations

import json

import pytest
import torch

from slimtorch.data import DeviceLoader, load_dataset, split_dataset
from slimtorch.train import TrainConfig
from slimtorch.train.classifier import train_classifier


def test_val_fraction_evaluates_on_held_out_training_images(tmp_path):
    cfg = TrainConfig(epochs=2, lr=0.05, seed=0, progress=False)
    run = train_classifier(
        model="mlp", dataset="digits", out_dir=tmp_path, train_config=cfg,
        batch_size=64, val_fraction=0.2, val_seed=3,
    )  # fmt: skip
    assert run.val_metrics is not None
    assert 0.0 <= run.val_metrics["accuracy"] <= 1.0
    # the last per-epoch evaluation ran on the validation split, not on the test split
    assert run.history["val_accuracy"][-1] == pytest.approx(run.val_metrics["accuracy"])
    assert run.history["eval_split"] == "val"
    # ... the split drawn with val_seed: the trained model scores exactly that on it
    _, val = split_dataset(load_dataset("digits", "train"), 0.2, seed=3)
    correct = 0
    with torch.no_grad():
        for x, y in DeviceLoader(val, 256):
            correct += int((run.model.eval()(x).argmax(1) == y).sum())
    assert correct / len(val) == pytest.approx(run.val_metrics["accuracy"])
    metrics = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert metrics["val_accuracy"] == pytest.approx(run.val_metrics["accuracy"])
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["extra"]["val_fraction"] == 0.2
    assert config["extra"]["val_seed"] == 3


def test_without_val_fraction_per_epoch_figures_are_on_the_test_split(tmp_path):
    cfg = TrainConfig(epochs=1, lr=0.05, seed=0, progress=False)
    run = train_classifier(
        model="mlp", dataset="digits", out_dir=None, train_config=cfg, batch_size=64
    )
    assert run.val_metrics is None
    assert run.history["val_accuracy"][-1] == pytest.approx(run.test_metrics["accuracy"])
    assert run.history["eval_split"] == "test"  # history.json says which split val_* came from


def test_bad_val_fraction_is_refused_before_training():
    cfg = TrainConfig(epochs=1, progress=False)
    with pytest.raises(ValueError, match="val_fraction"):
        train_classifier(
            model="mlp", dataset="digits", out_dir=None, train_config=cfg, val_fraction=1.5
        )


def test_batch_larger_than_the_training_split_is_named(tmp_path):
    # batches are kept full, so a batch past the split size would leave no batch at all
    cfg = TrainConfig(epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"batch_size 1200 is larger than the 1151 training"):
        train_classifier(
            model="mlp", dataset="digits", out_dir=tmp_path, train_config=cfg,
            batch_size=1200, val_fraction=0.2,
        )  # fmt: skip
    assert not any(tmp_path.iterdir())


def test_resume_with_another_split_or_augmentation_is_refused(tmp_path):
    from slimtorch.core.errors import CheckpointError
    from slimtorch.data import AugmentConfig

    cfg = TrainConfig(epochs=1, lr=0.05, progress=False)
    kw = dict(model="mlp", dataset="digits", out_dir=tmp_path, batch_size=64, augment=None)
    train_classifier(train_config=cfg, val_fraction=0.1, **kw)
    more = TrainConfig(epochs=2, lr=0.05, progress=False)
    with pytest.raises(CheckpointError, match=r"val_fraction: 0\.1 then, 0\.2 now"):
        train_classifier(train_config=more, val_fraction=0.2, resume=True, **kw)
    kw["augment"] = AugmentConfig(random_crop_padding=2)
    with pytest.raises(CheckpointError, match=r"augment: null then, \{"):
        train_classifier(train_config=more, val_fraction=0.1, resume=True, **kw)


def test_the_model_records_what_shaped_its_weights_beyond_the_train_config(tmp_path):
    # sparse training, distillation and batch-norm recalibration were recorded only inside
    # checkpoint.pt: a run could not be rebuilt from its JSON files
    from slimtorch.models import read_model_card
    from slimtorch.train import BatchNormRecalibration

    cfg = TrainConfig(epochs=1, lr=0.05, progress=False)
    train_classifier(model="resnet20", dataset="digits", out_dir=tmp_path, train_config=cfg,
                     batch_size=64, callbacks=[BatchNormRecalibration(3)])  # fmt: skip
    run = read_model_card(tmp_path / "model").extra["run"]
    assert run["batch_size"] == 64 and run["dataset"] == "digits"
    assert run["callbacks"] == {"BatchNormRecalibration": {"max_batches": 3}}
