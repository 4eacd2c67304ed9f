"""Exact outcomes of the pt2 program checks, transform replay and model-card lookup."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from torch import nn

from slimtorch.core.errors import ModelLoadError
from slimtorch.models import ARCH_TRANSFORMS, create_model, replay_transforms, save_model
from slimtorch.models.card import FORMAT_VERSION, holds_model, model_root, read_model_card
from slimtorch.models.pt2_program import guard_problem, program_problem, sym_expr_problem

NAMES = [str(i) for i in range(10)]


def _save(model: nn.Module, path: Path) -> Path:
    save_model(model, path, input_shape=(1, 28, 28), mean=[0.5], std=[0.25], class_names=NAMES)
    return path


def test_code_in_a_range_constraint_key_is_a_problem() -> None:
    program = {
        "graph_module": {},
        "guards_code": [],
        "range_constraints": {"__import__('os').system('id')": {}},
    }
    assert program_problem(program) is not None


def test_a_guard_naming_anything_but_l_is_a_problem() -> None:
    assert guard_problem("__builtins__ == 1") is not None


def test_a_guard_comparing_with_a_string_that_is_not_a_key_is_a_problem() -> None:
    assert guard_problem("L['x'].size()[0] == 'a\"b'") is not None


def test_a_symbol_keyword_that_is_not_a_constant_is_a_problem() -> None:
    assert sym_expr_problem("Symbol('s0', integer=s1)") is not None


def _pop_width(model: nn.Module, params: dict[str, Any]) -> None:
    params.pop("width")  # a transform that consumes its params


@pytest.fixture
def popper() -> Iterator[str]:
    name = f"test-only-pop-{uuid.uuid4().hex}"
    ARCH_TRANSFORMS.add(name, _pop_width)
    yield name
    ARCH_TRANSFORMS._items.pop(name)


def test_replay_hands_each_transform_its_own_copy_of_the_params(popper: str) -> None:
    model = create_model("lenet5", in_channels=1, input_size=28)
    records = [{"name": popper, "params": {"width": 60}}]
    replay_transforms(model, records)
    assert records == [{"name": popper, "params": {"width": 60}}]
    assert model.slimtorch_arch["transforms"] == [{"name": popper, "params": {"width": 60}}]


def test_a_card_from_a_newer_format_asks_to_upgrade(tmp_path: Path) -> None:
    d = _save(create_model("mlp"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["format_version"] = FORMAT_VERSION + 1
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="upgrade slimtorch"):
        read_model_card(d)


def test_an_existing_empty_folder_does_not_hold_its_backup_model(tmp_path: Path) -> None:
    saved = _save(create_model("mlp"), tmp_path / "saved")
    (tmp_path / "d" / "model").mkdir(parents=True)
    shutil.copytree(saved, tmp_path / "d" / ".model.old")
    # the backup stands in only for a missing folder, not an empty one
    assert holds_model(tmp_path / "d" / "model") is False


def test_model_root_prefers_the_model_saved_at_the_path_itself(tmp_path: Path) -> None:
    run = _save(create_model("lenet5", in_channels=1, input_size=28), tmp_path / "run")
    _save(create_model("mlp"), run / "model")
    assert model_root(run) == run
