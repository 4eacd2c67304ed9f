"""The Trainer refuses diverged runs, bad labels, lying loaders and malformed checkpoints."""

from __future__ import annotations

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
    with pytest.raises(ValueError, match=r"device must be like .* got 'gpu'"):
        Trainer(nn.Linear(4, 2), CFG, device="gpu")


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
