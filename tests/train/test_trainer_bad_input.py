"""The Trainer refuses diverged runs, bad labels, lying loaders and malformed checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from slimtorch.core.errors import CheckpointError
from slimtorch.train import TrainConfig, Trainer
from slimtorch.train.trainer_state import check_not_diverged

CFG = TrainConfig(epochs=2, progress=False)


def _loader(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)) for _ in range(n)
    ]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    Trainer(nn.Linear(4, 2), TrainConfig(epochs=1, progress=False), out_dir=tmp_path).fit(_loader())
    good = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    bad = [*_loader(1), (torch.full((8, 4), float("nan")), torch.zeros(8, dtype=torch.long))]
    with pytest.raises(FloatingPointError, match=r"training diverged at epoch 1.*loss is nan"):
        Trainer(nn.Linear(4, 2), CFG, out_dir=tmp_path).fit(bad)
    kept = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    torch.testing.assert_close(kept["model"], good["model"])
    assert torch.isfinite(kept["model"]["weight"]).all()


@pytest.mark.parametrize("label", [5, -1, -100])
def test_labels_outside_the_classes_are_refused(label):
    bad = [(torch.randn(8, 4), torch.full((8,), label))]
    with pytest.raises(ValueError, match=f"holds label {label}, .* outputs 2 classes"):
        Trainer(nn.Linear(4, 2), CFG).fit(bad)
    with pytest.raises(ValueError, match=f"batch 0 of loader holds label {label}"):
        Trainer(nn.Linear(4, 2), CFG).evaluate(bad)


@pytest.mark.parametrize(
    ("bad", "error", "message", "note"),
    [
        ((torch.randint(0, 9, (8, 4), dtype=torch.uint8), torch.zeros(8, dtype=torch.long)),
         RuntimeError, "dtype", "inputs uint8 (8, 4) on cpu"),
        ((torch.randn(8, 4), torch.rand(8)), RuntimeError, "target", "targets float32 (8,)"),
        ((torch.randn(8, 5), torch.zeros(8, dtype=torch.long)),
         RuntimeError, "cannot be multiplied", "(8, 5)"),
    ],
)  # fmt: skip
def test_an_error_inside_a_step_names_the_batch_and_its_tensors(bad, error, message, note):
    with pytest.raises(error, match=message) as info:
        Trainer(nn.Linear(4, 2), CFG).fit([*_loader(2), bad])
    assert info.value.__notes__[0].startswith("raised by batch 2 of train_loader: ")
    assert note in info.value.__notes__[0]
    with pytest.raises(error) as info:
        Trainer(nn.Linear(4, 2), CFG).evaluate([bad])
    assert info.value.__notes__[0].startswith("raised by batch 0 of loader: ")


def test_a_batch_that_is_not_a_pair_is_named():
    bad = {"x": torch.randn(8, 4), "y": torch.zeros(8, dtype=torch.long)}
    with pytest.raises(TypeError, match=r"train_loader batch 1 must be an \(inputs, targets\)"):
        Trainer(nn.Linear(4, 2), CFG).fit([*_loader(1), bad])


class _Liar:
    def __len__(self) -> int:
        return 3

    def __iter__(self):
        return iter([])


def test_loader_yielding_fewer_batches_than_its_len_is_refused(tmp_path):
    with pytest.raises(ValueError, match="yielded 0 batches in epoch 1 but len"):
        Trainer(nn.Linear(4, 2), CFG, out_dir=tmp_path).fit(_Liar())
    assert not (tmp_path / "checkpoint.pt").exists()
    with pytest.raises(ValueError, match="loader yielded no batches although len"):
        Trainer(nn.Linear(4, 2), CFG).evaluate(_Liar())


def test_malformed_checkpoint_field_is_a_checkpoint_error(tmp_path):
    Trainer(nn.Linear(4, 2), CFG, out_dir=tmp_path).fit(_loader())
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    state["epoch"] = "x"
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="holds a malformed field"):
        Trainer(nn.Linear(4, 2), CFG.replace(epochs=3), out_dir=tmp_path).fit(
            _loader(), resume=True
        )


def test_bad_device_string_is_a_value_error():
    with pytest.raises(ValueError, match=r"invalid device 'gpu'"):
        Trainer(nn.Linear(4, 2), CFG, device="gpu")
    assert Trainer(nn.Linear(4, 2), CFG, device="auto").device.type in ("cpu", "cuda", "mps")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_a_gpu_that_is_not_there_is_named_before_training():
    # not torch's "Torch not compiled with CUDA enabled" from the first .to()
    for spec in ("cuda", "rocm", "cuda:1"):
        with pytest.raises(ValueError, match=rf"device '{spec}' asked for a CUDA/ROCm GPU"):
            Trainer(nn.Linear(4, 2), CFG, device=spec)


def test_nan_mean_loss_with_finite_weights_only_warns(caplog):
    # the fp16 gradient scaler skips an overflowing step: the epoch's mean loss is inf/NaN but
    # the weights are good, so the run goes on
    trainer = Trainer(nn.Linear(4, 2), CFG)
    with caplog.at_level("WARNING", logger="slimtorch.train.trainer_state"):
        check_not_diverged(trainer, float("inf"))
    assert "mean training loss is inf (parameters are finite)" in caplog.text
    with torch.no_grad():
        trainer.model.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="parameters weight are not finite"):
        check_not_diverged(trainer, 1.0)


def test_a_custom_loss_may_use_labels_outside_the_outputs():
    # e.g. ignore_index: only the default cross-entropy has its labels checked
    batch = [(torch.randn(8, 4), torch.tensor([0, 1, -100, 1, 0, 1, 0, -100]))]
    trainer = Trainer(nn.Linear(4, 2), CFG, loss_fn=nn.CrossEntropyLoss(ignore_index=-100))
    assert trainer.evaluate(batch)["n"] == 8


def test_an_fp16_scaler_that_skips_step_after_step_is_divergence(caplog):
    trainer = Trainer(nn.Linear(4, 2), CFG)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    with caplog.at_level("WARNING", logger="slimtorch.train.trainer_state"):
        check_not_diverged(trainer, float("nan"))  # a few skipped steps: the run goes on
    assert "mean training loss is nan (parameters are finite)" in caplog.text
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**-5)  # halved 21 times
    with pytest.raises(FloatingPointError, match=r"scaler skipped step after step \(its scale"):
        check_not_diverged(trainer, float("nan"))
    check_not_diverged(trainer, 0.5)  # a finite loss with a small scale is not divergence


def test_a_onecycle_run_resumes_only_for_its_own_length(tmp_path):
    cfg = TrainConfig(epochs=1, schedule="onecycle", progress=False)
    Trainer(nn.Linear(4, 2), cfg, out_dir=tmp_path).fit(_loader(8))
    saved = (tmp_path / "train_config.json").read_text()
    with pytest.raises(CheckpointError, match="written for 1 epochs of a one-cycle schedule"):
        Trainer(nn.Linear(4, 2), cfg.replace(epochs=2), out_dir=tmp_path).fit(
            _loader(8), resume=True
        )
    assert (tmp_path / "train_config.json").read_text() == saved
    cosine = TrainConfig(epochs=1, progress=False)
    Trainer(nn.Linear(4, 2), cosine, out_dir=tmp_path / "c").fit(_loader())
    history = Trainer(nn.Linear(4, 2), cosine.replace(epochs=2), out_dir=tmp_path / "c").fit(
        _loader(), resume=True
    )
    assert history.to_dict()["epoch"] == [1, 2]


def test_train_and_test_splits_of_different_shapes_are_refused_before_training(
    tmp_path, monkeypatch
):
    from slimtorch.data import ImageDataset
    from slimtorch.train import classifier

    def split(name, which, **kw):
        side = 8 if which == "train" else 4
        return ImageDataset(
            name="odd", images=torch.zeros(64, 1, side, side, dtype=torch.uint8),
            labels=torch.arange(64) % 3, classes=("a", "b", "c"), mean=(0.5,), std=(0.25,),
        )  # fmt: skip

    monkeypatch.setattr(classifier, "load_dataset", split)
    with pytest.raises(ValueError, match=r"test split has images \(1, 4, 4\) and 3 classes, the "):
        classifier.train_classifier(
            model="mlp", dataset="digits", out_dir=tmp_path / "run", train_config=CFG
        )
    assert not (tmp_path / "run").exists()


def test_empty_batches_fail_training_by_index_and_add_nothing_to_evaluation() -> None:
    x = torch.randn(48, 8)
    y = x[:, :4].argmax(1)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 48, 16)]
    trainer = Trainer(nn.Linear(8, 4), TrainConfig(epochs=1, progress=False))
    full = trainer.evaluate(batches)
    with_empty = trainer.evaluate([*batches, (x[:0], y[:0])])
    assert with_empty == full and math.isfinite(with_empty["loss"])
    with pytest.raises(ValueError, match="train_loader batch 3 is empty"):
        trainer.fit([*batches, (x[:0], y[:0])])


def test_labels_are_checked_in_every_batch_not_only_the_first() -> None:
    # the default loss, made on the first batch, then counted as a custom one: a bad label in
    # batch 1 gave torch's bare IndexError, and -100 a NaN loss with only a warning
    for label in (4, -100):
        bad = [*_loader(1), (torch.randn(8, 4), torch.full((8,), label))]
        with pytest.raises(ValueError, match=f"batch 1 of train_loader holds label {label}, "):
            Trainer(nn.Linear(4, 2), CFG).fit(bad)
    trainer = Trainer(nn.Linear(4, 2), TrainConfig(epochs=1, progress=False))
    trainer.fit(_loader())
    with pytest.raises(ValueError, match="batch 0 of loader holds label -100"):
        trainer.evaluate([(torch.randn(8, 4), torch.full((8,), -100))])


def test_a_diverged_run_names_the_batch_whose_loss_first_went_non_finite() -> None:
    # the check runs at the end of the epoch: the message named the last step only
    bad = [*_loader(1), (torch.full((8, 4), float("nan")), torch.zeros(8, dtype=torch.long))]
    with pytest.raises(FloatingPointError, match=r"at epoch 1, step 5 \(its loss was first "
                       r"non-finite at batch 1 of the epoch\)"):  # fmt: skip
        Trainer(nn.Linear(4, 2), CFG).fit([*bad, *_loader(3)])
