"""Resume compatibility: the model's architecture kwargs and the torch version that wrote a
checkpoint are recorded in it, and older checkpoints without them still resume."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

from slimtorch.core.errors import CheckpointError
from slimtorch.train import TrainConfig, Trainer, load_checkpoint, save_checkpoint
from slimtorch.train.classifier import train_classifier
from slimtorch.train.trainer_state import RECORD_VERSION
from train_helpers import ListLoader, make_blobs, make_mlp

X, Y = make_blobs(64, seed=3)
_STATE_LOGGER = "slimtorch.train.trainer_state"


def _fit(out: Path, epochs: int, resume: bool = False, **cfg: Any) -> Trainer:
    torch.manual_seed(0)
    config = TrainConfig(epochs=epochs, lr=0.05, seed=7, progress=False, **cfg)
    trainer = Trainer(make_mlp(), config, out_dir=out)
    trainer.fit(ListLoader(X, Y, 8), resume=resume)
    return trainer


def _classifier(out: Path, epochs: int, resume: bool = False, **model_kwargs: Any) -> Any:
    cfg = TrainConfig(epochs=epochs, lr=0.05, progress=False)
    return train_classifier(model=model_kwargs.pop("model", "mobilenetv2"), dataset="digits",
                            out_dir=out, train_config=cfg, batch_size=128, augment=None,
                            model_kwargs=model_kwargs, resume=resume)  # fmt: skip


def test_a_resume_with_other_model_kwargs_is_refused(tmp_path: Path) -> None:
    # the dropout changes no weight shape: the resume went through, and the model card
    # recorded the new dropout for weights trained with the old one
    _classifier(tmp_path, 1, width_mult=0.25, dropout=0.0)
    saved = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(CheckpointError, match=r"model_kwargs\.dropout: 0\.0 then, 0\.9 now"):
        _classifier(tmp_path, 2, resume=True, width_mult=0.25, dropout=0.9)
    assert (tmp_path / "checkpoint.pt").read_bytes() == saved


def test_a_record_without_model_kwargs_still_resumes(tmp_path: Path) -> None:
    _classifier(tmp_path, 1, model="mlp", hidden=[16])
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["run"]["record_version"] == RECORD_VERSION
    assert state["run"]["model_kwargs"]["hidden"] == [16]
    # as written before the record held the model's kwargs
    del state["run"]["model_kwargs"]
    state["run"]["record_version"] = RECORD_VERSION - 1
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    run = _classifier(tmp_path, 2, resume=True, model="mlp", hidden=[16])
    assert run.history["epoch"] == [1, 2]


def _other_minor() -> str:
    major, minor = re.findall(r"\d+", torch.__version__)[:2]
    return f"{major}.{int(minor) + 1}.0+cu128"


def test_a_checkpoint_of_another_torch_version_resumes_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _fit(tmp_path, 1)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["torch_version"] == str(torch.__version__)
    state["torch_version"] = _other_minor()
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    now = ".".join(re.findall(r"\d+", torch.__version__)[:2])
    then = ".".join(_other_minor().split(".")[:2])
    with caplog.at_level("WARNING", logger=_STATE_LOGGER):
        assert _fit(tmp_path, 2, resume=True).history.to_dict()["epoch"] == [1, 2]
    assert f"written by torch {then}, resuming under {now}: results may differ" in caplog.text


def test_a_checkpoint_without_a_torch_version_resumes_quietly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _fit(tmp_path, 1)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert "torch_version" in state
    # as written before the version was stored; a patch release of the same minor is quiet too
    for version in (None, re.sub(r"^(\d+\.\d+)\.\d+", r"\g<1>.99", torch.__version__)):
        if version is None:
            del state["torch_version"]
        else:
            state["torch_version"] = version
        save_checkpoint(tmp_path / "checkpoint.pt", state)
        caplog.clear()
        with caplog.at_level("WARNING", logger=_STATE_LOGGER):
            assert _fit(tmp_path, 2, resume=True).history.to_dict()["epoch"] == [1, 2]
        assert "written by torch" not in caplog.text


def test_dropping_the_gradient_scaler_state_is_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _fit(tmp_path, 1, amp="fp16")  # a CPU fp16 run has a gradient scaler
    assert load_checkpoint(tmp_path / "checkpoint.pt")["scaler"]
    with caplog.at_level("WARNING", logger=_STATE_LOGGER):
        _fit(tmp_path, 2, resume=True, amp="auto")  # auto: full precision on the CPU
    assert re.search(r"changed config fields: amp, epochs; .*scaler state is dropped", caplog.text)
