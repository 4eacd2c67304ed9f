"""Tests for slimtorch.models.transforms: recorded architecture changes are replayed on load."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from slimtorch.core.errors import ModelLoadError
from slimtorch.models import (
    ARCH_TRANSFORMS,
    create_model,
    load_model,
    record_transform,
    replay_transforms,
    save_model,
)


def _narrow_hidden(model: nn.Module, params: dict[str, Any]) -> None:
    """Replace the mlp's first hidden Linear by a narrower one (like channel pruning)."""
    width = params["width"]
    first, second = model.features[1], model.features[3]
    model.features[1] = nn.Linear(first.in_features, width)
    model.features[3] = nn.Linear(width, second.out_features)


@pytest.fixture
def narrow_name() -> str:
    name = f"test-only-narrow-{uuid.uuid4().hex}"
    ARCH_TRANSFORMS.add(name, _narrow_hidden)
    return name


def test_record_appends_json_copy(narrow_name: str) -> None:
    model = create_model("mlp", input_size=8, hidden=[16, 8])
    params = {"width": 4}
    record_transform(model, narrow_name, params)
    params["width"] = 99  # the record is a copy
    assert model.slimtorch_arch["transforms"] == [{"name": narrow_name, "params": {"width": 4}}]


def test_record_rejects_bad_input(narrow_name: str) -> None:
    model = create_model("mlp", input_size=8)
    with pytest.raises(ValueError, match="unknown architecture transform 'no-such-transform'"):
        record_transform(model, "no-such-transform", {})
    with pytest.raises(ValueError, match="must be JSON-serialisable"):
        record_transform(model, narrow_name, {"layer": nn.ReLU()})
    with pytest.raises(ValueError, match="has no slimtorch_arch record"):
        record_transform(nn.Linear(2, 2), narrow_name, {})
    assert model.slimtorch_arch["transforms"] == []


def test_saved_transform_is_replayed_before_loading(tmp_path: Path, narrow_name: str) -> None:
    model = create_model("mlp", input_size=8, hidden=[16, 8])
    _narrow_hidden(model, {"width": 4})
    record_transform(model, narrow_name, {"width": 4})
    model.eval()
    x = torch.randn(5, 1, 8, 8)
    save_model(model, tmp_path / "m", input_shape=(1, 8, 8), mean=[0.0], std=[1.0],
               class_names=[str(i) for i in range(10)])  # fmt: skip
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["transforms"] == [{"name": narrow_name, "params": {"width": 4}}]
    loaded, card = load_model(tmp_path / "m")
    assert loaded.features[1].out_features == 4
    assert card.transforms == [{"name": narrow_name, "params": {"width": 4}}]
    assert loaded.slimtorch_arch["transforms"] == card.transforms
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_unregistered_transform_on_load(tmp_path: Path, narrow_name: str) -> None:
    model = create_model("mlp", input_size=8, hidden=[16, 8])
    save_model(model, tmp_path / "m", input_shape=(1, 8, 8), mean=[0.0], std=[1.0],
               class_names=[str(i) for i in range(10)])  # fmt: skip
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    config["transforms"] = [{"name": "gone.transform", "params": {}}]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"'gone\.transform', which is not registered here"):
        load_model(tmp_path / "m")


def test_failing_or_malformed_replay_raises_model_load_error(narrow_name: str) -> None:
    model = create_model("mlp", input_size=8, hidden=[16])  # features[3] does not exist
    with pytest.raises(ModelLoadError, match=rf"replaying architecture transform '{narrow_name}'"):
        replay_transforms(model, [{"name": narrow_name, "params": {"width": 2}}])
    with pytest.raises(ModelLoadError, match="transform record 0 is malformed"):
        replay_transforms(model, [{"params": {}}])


def test_a_transform_of_a_newer_version_is_refused_not_replayed_differently(
    tmp_path: Path, narrow_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record whose params mean something this slimtorch does not know (a newer release
    changed them) was replayed as if it were the old form."""
    from slimtorch.models import transforms

    monkeypatch.setitem(transforms.TRANSFORM_VERSIONS, narrow_name, 2)
    model = create_model("mlp", input_size=8, hidden=[16, 8])
    _narrow_hidden(model, {"width": 4})
    record_transform(model, narrow_name, {"width": 4})
    assert model.slimtorch_arch["transforms"][-1]["version"] == 2
    save_model(model, tmp_path / "m", input_shape=(1, 8, 8), mean=[0.0], std=[1.0],
               class_names=[str(i) for i in range(10)])  # fmt: skip
    assert load_model(tmp_path / "m")[0].features[1].out_features == 4  # same version: fine
    monkeypatch.setitem(transforms.TRANSFORM_VERSIONS, narrow_name, 1)  # an older slimtorch
    with pytest.raises(ModelLoadError, match="is of version 2, written by a newer slimtorch"):
        load_model(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["transforms"][0]["version"] = "2"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="is of version '2'"):
        load_model(tmp_path / "m")
