"""Checkpoint and resume: a run killed mid-epoch resumes to exactly the uninterrupted weights."""

from __future__ import annotations

import math
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from slimtorch.core.errors import CheckpointError
from slimtorch.train import (
    Callback,
    EarlyStopping,
    TrainConfig,
    Trainer,
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from train_helpers import Crash, KillAt, ListLoader, StartBatchLoader, make_blobs, make_mlp

X, Y = make_blobs(64, seed=3)
XV, YV = make_blobs(32, seed=4)


class _Counter(Callback):
    """Has state: the number of batches it has seen (must survive the resume)."""

    def __init__(self) -> None:
        self.seen = 0

    def on_train_batch_end(self, trainer: Trainer, outputs: Any, loss: Any, batch_idx: int) -> None:
        self.seen += 1

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = state["seen"]


def _config(**kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        epochs=3,
        optimizer="sgd",
        lr=0.05,
        momentum=0.9,
        nesterov=True,
        weight_decay=1e-3,
        schedule="cosine",
        warmup_epochs=0.5,
        label_smoothing=0.1,
        amp="off",
        seed=7,
        checkpoint_every_steps=5,
        progress=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def _run(
    out_dir: Path,
    loader_cls: type[ListLoader],
    callbacks: list[Callback],
    *,
    resume: bool = False,
    model_seed: int = 0,
    **cfg: Any,
) -> Trainer:
    torch.manual_seed(model_seed)
    model = make_mlp(dropout=0.25)  # dropout: the RNG streams must be restored too
    trainer = Trainer(model, _config(**cfg), callbacks=callbacks, out_dir=out_dir)
    trainer.fit(loader_cls(X, Y, 8), ListLoader(XV, YV, 16, shuffle=False), resume=resume)
    return trainer


def _torch_loader(x: torch.Tensor, y: torch.Tensor, batch: int) -> DataLoader:
    """A plain torch DataLoader: its shuffle draws from the global RNG at ``iter()``."""
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True)


@pytest.mark.parametrize("loader_cls", [ListLoader, StartBatchLoader, _torch_loader])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_killed_mid_epoch_run_resumes_to_identical_weights(
    tmp_path: Path, loader_cls: type[ListLoader], optimizer: str
) -> None:
    # 8 steps per epoch; checkpoints at global steps 5 and 10 (epoch 1, batch 2); crash at 13
    lr = 0.05 if optimizer == "sgd" else 0.01
    ref_counter = _Counter()
    ref = _run(tmp_path / "ref", loader_cls, [ref_counter], optimizer=optimizer, lr=lr)

    counter = _Counter()
    with pytest.raises(Crash):
        _run(tmp_path / "run", loader_cls, [counter, KillAt(13)], optimizer=optimizer, lr=lr)
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert (saved["epoch"], saved["step_in_epoch"], saved["global_step"]) == (1, 2, 10)

    counter2 = _Counter()
    kw: dict[str, Any] = {"optimizer": optimizer, "lr": lr}
    resumed = _run(tmp_path / "run", loader_cls, [counter2], resume=True, model_seed=99, **kw)
    assert resumed.global_step == ref.global_step == 24
    for (name, p_ref), (_, p_res) in zip(
        ref.model.state_dict().items(), resumed.model.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(p_res, p_ref, rtol=0, atol=0, msg=f"parameter {name}")
    assert counter2.seen == ref_counter.seen == 24
    h_ref, h_res = ref.history.to_dict(), resumed.history.to_dict()
    for key in ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"):
        assert h_res[key] == pytest.approx(h_ref[key], rel=1e-12), key


def test_resume_from_an_epoch_end_checkpoint(tmp_path: Path) -> None:
    ref = _run(tmp_path / "ref", ListLoader, [], checkpoint_every_steps=0)
    with pytest.raises(Crash):
        _run(tmp_path / "run", ListLoader, [KillAt(19)], checkpoint_every_steps=0)
    interrupted = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert interrupted["epoch"] == 2 and interrupted["train_seconds"] > 0.0
    resumed = _run(tmp_path / "run", ListLoader, [], resume=True, checkpoint_every_steps=0)
    for p_ref, p_res in zip(ref.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(p_res, p_ref, rtol=0, atol=0)
    assert resumed.history.epoch == [1, 2, 3]
    # the time behind the model includes the interrupted run's, up to its checkpoint
    assert resumed.seconds_before == interrupted["train_seconds"]
    assert resumed.train_seconds > resumed.seconds_before
    final = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["train_seconds"]
    assert resumed.seconds_before < final <= resumed.train_seconds
    assert ref.seconds_before == 0.0 and ref.train_seconds > 0.0


def test_start_batch_is_used_when_the_loader_supports_it(tmp_path: Path) -> None:
    with pytest.raises(Crash):
        _run(tmp_path, StartBatchLoader, [KillAt(13)])
    torch.manual_seed(0)
    loader = StartBatchLoader(X, Y, 8)
    trainer = Trainer(make_mlp(dropout=0.25), _config(), out_dir=tmp_path)
    trainer.fit(loader, resume=True)
    assert loader.start_calls == [2]


def test_early_stopping_state_is_checkpointed(tmp_path: Path) -> None:
    stopper = EarlyStopping(patience=5)
    _run(tmp_path, ListLoader, [stopper], epochs=2)
    state = load_checkpoint(tmp_path / "checkpoint.pt")["callbacks"]["EarlyStopping"]
    assert state == {"best": stopper.best, "wait": stopper.wait, "stopped_epoch": None}
    assert isinstance(state["best"], float)


def test_a_run_stopped_early_stays_stopped_on_resume(tmp_path: Path) -> None:
    stopper = EarlyStopping("val_loss", patience=1, min_delta=10.0)  # stops after 2 epochs
    first = _run(tmp_path, ListLoader, [stopper], epochs=5)
    assert first.history.epoch == [1, 2] and stopper.stopped_epoch == 2
    again = _run(tmp_path, ListLoader, [EarlyStopping("val_loss", patience=1, min_delta=10.0)],
                 resume=True, epochs=5)  # fmt: skip
    assert again.global_step == first.global_step and again.history.epoch == [1, 2]


def test_a_resume_cannot_change_what_the_optimiser_state_keeps(tmp_path: Path) -> None:
    with pytest.raises(Crash):
        _run(tmp_path, ListLoader, [KillAt(13)])
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(CheckpointError, match=r"written with lr=0\.05 \(now 0\.01\).*same values"):
        _run(tmp_path, ListLoader, [], resume=True, lr=0.01)
    with pytest.raises(CheckpointError, match=r"weight_decay=0\.001 \(now 0\.0\)"):
        _run(tmp_path, ListLoader, [], resume=True, weight_decay=0.0)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_extending_a_cosine_run_follows_the_new_schedule_from_the_first_step(
    tmp_path: Path,
) -> None:
    _run(tmp_path, ListLoader, [], epochs=1, warmup_epochs=0.0)  # ends at lr 0
    seen: list[float] = []

    class _Lr(Callback):
        def on_train_batch_start(self, trainer: Trainer, batch: Any, batch_idx: int) -> None:
            assert trainer.optimizer is not None
            seen.append(trainer.optimizer.param_groups[0]["lr"])

    resumed = _run(tmp_path, ListLoader, [_Lr()], resume=True, epochs=2, warmup_epochs=0.0)
    # step 8 of a 16-step cosine from 0.05: halfway down, not the 1-epoch run's final 0
    assert seen[0] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * 8 / 16)))
    assert resumed.global_step == 16


def test_a_flipped_byte_inside_a_tensor_is_caught_by_the_crc(tmp_path: Path) -> None:
    _run(tmp_path, ListLoader, [], epochs=1)
    path = tmp_path / "checkpoint.pt"
    with zipfile.ZipFile(path) as archive:
        entry = next(i for i in archive.infolist() if "/data/" in i.filename)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack(
        "<HH", raw[entry.header_offset + 26 : entry.header_offset + 30]
    )
    raw[entry.header_offset + 30 + name_len + extra_len + 1] ^= 0xFF  # inside the tensor bytes
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt is corrupt: the CRC of its entry"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("field", "value"), [("rng", {}), ("meter", {"n": 1}), ("history", {"epoch": 3}),
                         ("step_in_epoch", 99), ("epoch", -5)],
)  # fmt: skip
def test_malformed_fields_are_named(tmp_path: Path, field: str, value: Any) -> None:
    with pytest.raises(Crash):
        _run(tmp_path, ListLoader, [KillAt(13)])
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    save_checkpoint(tmp_path / "checkpoint.pt", {**state, field: value})
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt holds a malformed field"):
        _run(tmp_path, ListLoader, [], resume=True)


def test_optimiser_state_of_the_wrong_shape_is_named_before_the_first_step(
    tmp_path: Path,
) -> None:
    with pytest.raises(Crash):
        _run(tmp_path, ListLoader, [KillAt(13)])
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    first = next(iter(state["optimizer"]["state"]))
    state["optimizer"]["state"][first]["momentum_buffer"] = torch.zeros(7)
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt does not match.*'momentum_buffer'"):
        _run(tmp_path, ListLoader, [], resume=True)


def test_corrupt_checkpoint_raises_checkpoint_error_with_path(tmp_path: Path) -> None:
    _run(tmp_path, ListLoader, [], epochs=1)
    path = tmp_path / "checkpoint.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt could not be read.*delete or move"):
        _run(tmp_path, ListLoader, [], resume=True, epochs=1)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("unpickled!",))


def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": "slimtorch.train.checkpoint", "version": 1, "x": _Evil()}, path)
    with pytest.raises(CheckpointError, match="could not be read"):
        load_checkpoint(path)
    path.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(CheckpointError, match="could not be read"):
        load_checkpoint(path)


def test_foreign_or_mismatched_checkpoints(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a slimtorch training checkpoint"):
        load_checkpoint(path)
    save_checkpoint(path, {"epoch": 0})
    with pytest.raises(CheckpointError, match="lacks model"):
        load_checkpoint(path, required=("model", "epoch"))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    # a run with another batch size cannot continue this checkpoint
    _run(tmp_path / "a", ListLoader, [], epochs=1)
    trainer = Trainer(make_mlp(dropout=0.25), _config(epochs=1), out_dir=tmp_path / "a")
    with pytest.raises(CheckpointError, match="steps per epoch"):
        trainer.fit(ListLoader(X, Y, 16), resume=True)
    # a different architecture does not match
    other = Trainer(make_mlp(hidden=5), _config(), out_dir=tmp_path / "a")
    with pytest.raises(CheckpointError, match="does not match"):
        other.fit(ListLoader(X, Y, 8), resume=True)


def test_resume_without_checkpoint_starts_fresh(tmp_path: Path) -> None:
    trainer = _run(tmp_path, ListLoader, [], resume=True, epochs=1)
    assert trainer.global_step == 8


def test_rng_state_round_trip_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    import random

    import numpy as np

    path = tmp_path / "rng.pt"
    save_checkpoint(path, {"rng": get_rng_state()})
    expected = (torch.rand(3), random.random(), np.random.rand(2))
    set_rng_state(load_checkpoint(path)["rng"])
    torch.testing.assert_close(torch.rand(3), expected[0])
    assert random.random() == expected[1]
    np.testing.assert_array_equal(np.random.rand(2), expected[2])


def test_a_resume_with_other_data_or_callbacks_is_refused_before_anything_changes(
    tmp_path: Path,
) -> None:
    from slimtorch.distill import DistillationCallback, DistillConfig

    def trainer(run: dict[str, Any], teacher_seed: int, temperature: float = 4.0) -> Trainer:
        torch.manual_seed(teacher_seed)
        teacher = make_mlp()
        cb = DistillationCallback(teacher, DistillConfig(temperature=temperature))
        torch.manual_seed(0)
        t = Trainer(make_mlp(), _config(epochs=2), callbacks=[cb], out_dir=tmp_path)
        t.run_info = run
        return t

    first = trainer({"dataset": "mnist", "batch_size": 8}, teacher_seed=1)
    first.fit(ListLoader(X, Y, 8))
    saved = (tmp_path / "checkpoint.pt").read_bytes()
    config_json = (tmp_path / "train_config.json").read_text()
    # same steps per epoch, another dataset: the checkpoint names what changed
    other = trainer({"dataset": "fashion-mnist", "batch_size": 8}, teacher_seed=1)
    with pytest.raises(CheckpointError, match=r'dataset: "mnist" then, "fashion-mnist" now'):
        other.fit(ListLoader(X, Y, 8), resume=True)
    for run, seed, temperature, what in (
        ({"dataset": "mnist", "batch_size": 8}, 2, 4.0, r"DistillationCallback\.teacher: "),
        ({"dataset": "mnist", "batch_size": 8}, 1, 2.0, r"config\.temperature: 4\.0 then, 2\.0"),
    ):
        with pytest.raises(CheckpointError, match=what):
            trainer(run, seed, temperature).fit(ListLoader(X, Y, 8), resume=True)
    no_teacher = Trainer(make_mlp(), _config(epochs=2), out_dir=tmp_path)
    no_teacher.run_info = {"dataset": "mnist", "batch_size": 8}
    with pytest.raises(CheckpointError, match="DistillationCallback: set then, not set now"):
        no_teacher.fit(ListLoader(X, Y, 8), resume=True)
    assert (tmp_path / "checkpoint.pt").read_bytes() == saved
    assert (tmp_path / "train_config.json").read_text() == config_json
    # the same run resumes (a key only one side records is not compared)
    same = trainer({"dataset": "mnist", "batch_size": 8, "new_key": 1}, teacher_seed=1)
    assert same.fit(ListLoader(X, Y, 8), resume=True).epoch == [1, 2]
    # a checkpoint written before runs were recorded resumes as before
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    del state["run"]
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    assert other.fit(ListLoader(X, Y, 8), resume=True).epoch == [1, 2]


def test_a_resume_with_another_schedule_or_layers_is_refused(tmp_path: Path) -> None:
    """Pruning and sparse-training schedules, their layers and the final recalibration are
    part of the run, beside the callbacks' configs."""
    from slimtorch.prune import GradualPruning, MagnitudeConfig
    from slimtorch.sparse import SET, SparseTrainingConfig
    from slimtorch.train import BatchNormRecalibration

    def gradual(**kw: Any) -> GradualPruning:
        return GradualPruning(MagnitudeConfig(sparsity=0.5), **{"start_step": 0, "end_step": 4,
                              "frequency": 2, **kw})  # fmt: skip

    cases = [
        ([gradual()], [gradual(end_step=6)], r"GradualPruning\.end_step: 4 then, 6 now"),
        ([gradual()], [gradual(exclude=["2"])], r"GradualPruning\.exclude: null then"),
        ([SET(SparseTrainingConfig(sparsity=0.5, delta_t=2))],
         [SET(SparseTrainingConfig(sparsity=0.5, delta_t=2), total_steps=100)],
         r"SET\.total_steps: null then, 100 now"),
        ([BatchNormRecalibration(2)], [BatchNormRecalibration(3)],
         r"BatchNormRecalibration\.max_batches: 2 then, 3 now"),
    ]  # fmt: skip
    for i, (then, now, what) in enumerate(cases):
        out = tmp_path / str(i)
        torch.manual_seed(0)
        Trainer(make_mlp(), _config(epochs=1), callbacks=then, out_dir=out).fit(ListLoader(X, Y, 8))
        torch.manual_seed(0)
        again = Trainer(make_mlp(), _config(epochs=2), callbacks=now, out_dir=out)
        with pytest.raises(CheckpointError, match=what):
            again.fit(ListLoader(X, Y, 8), resume=True)


def test_a_checkpoint_of_an_older_record_resumes_without_the_fields_added_since(
    tmp_path: Path,
) -> None:
    from slimtorch.distill import DistillationCallback, DistillConfig
    from slimtorch.train import BatchNormRecalibration

    def callbacks() -> list[Callback]:
        torch.manual_seed(1)
        return [DistillationCallback(make_mlp(), DistillConfig()), BatchNormRecalibration(2)]

    torch.manual_seed(0)
    Trainer(make_mlp(), _config(epochs=1), callbacks=callbacks(), out_dir=tmp_path).fit(
        ListLoader(X, Y, 8)
    )
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    del state["run"]["record_version"]  # as written before the recalibration was recorded
    del state["run"]["callbacks"]["BatchNormRecalibration"]
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    torch.manual_seed(0)
    again = Trainer(make_mlp(), _config(epochs=2), callbacks=callbacks(), out_dir=tmp_path)
    assert again.fit(ListLoader(X, Y, 8), resume=True).epoch == [1, 2]
    # what the older record does hold is still compared: a callback left out is refused
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    plain = Trainer(make_mlp(), _config(epochs=2), out_dir=tmp_path)
    with pytest.raises(CheckpointError, match="DistillationCallback: set then, not set now"):
        plain.fit(ListLoader(X, Y, 8), resume=True)


def test_resume_keeps_a_custom_eval_name_and_ignores_momentum_for_adamw(tmp_path: Path) -> None:
    def run(resume: bool, **cfg: Any) -> Trainer:
        torch.manual_seed(0)
        trainer = Trainer(make_mlp(), _config(**cfg), out_dir=tmp_path)
        trainer.eval_name = "dev"
        trainer.fit(ListLoader(X, Y, 8), ListLoader(XV, YV, 16, shuffle=False), resume=resume)
        return trainer

    run(False, epochs=1, optimizer="adamw", lr=0.01)
    # AdamW has no momentum: a changed momentum/nesterov changes nothing, so it is allowed
    again = run(True, epochs=2, optimizer="adamw", lr=0.01, momentum=0.5, nesterov=False)
    assert again.history.epoch == [1, 2] and again.history.eval_split == "dev"


def test_a_run_killed_after_its_last_checkpoint_gets_its_history_on_resume(
    tmp_path: Path,
) -> None:
    # the checkpoint is written before history.json: a kill between them left history.json an
    # epoch short, and a resume with nothing left to train never wrote it again
    import json

    cfg = TrainConfig(epochs=2, lr=0.1, progress=False)
    torch.manual_seed(0)
    Trainer(make_mlp(), cfg, out_dir=tmp_path).fit(ListLoader(X, Y, 16))
    full = json.loads((tmp_path / "history.json").read_text())
    short = {k: v[:1] if isinstance(v, list) else v for k, v in full.items()}
    (tmp_path / "history.json").write_text(json.dumps(short))  # as the kill left it
    torch.manual_seed(0)
    Trainer(make_mlp(), cfg, out_dir=tmp_path).fit(ListLoader(X, Y, 16), resume=True)
    assert json.loads((tmp_path / "history.json").read_text()) == full


def test_a_resume_with_another_seed_is_refused(tmp_path: Path) -> None:
    # it was accepted with a warning and the run then recorded seed 7, though its initial
    # weights and first epochs came from seed 0 (a resume continues the saved random streams)
    torch.manual_seed(0)
    Trainer(make_mlp(), TrainConfig(epochs=1, progress=False), out_dir=tmp_path).fit(
        ListLoader(X, Y, 16)
    )
    more = TrainConfig(epochs=2, progress=False, seed=7)
    with pytest.raises(CheckpointError, match=r"written with seed=0 \(now 7\).*--seed 0"):
        Trainer(make_mlp(), more, out_dir=tmp_path).fit(ListLoader(X, Y, 16), resume=True)
    same = TrainConfig(epochs=2, progress=False, seed=0)
    Trainer(make_mlp(), same, out_dir=tmp_path).fit(ListLoader(X, Y, 16), resume=True)
