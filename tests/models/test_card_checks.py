"""load_model refuses a config.json that contradicts the architecture; save refuses NaN stats."""

from __future__ import annotations

import json

import pytest

from slimtorch.core.errors import ModelLoadError
from slimtorch.models import create_model, load_model, save_model

NAMES = [str(i) for i in range(10)]


@pytest.fixture
def saved(tmp_path):
    model = create_model("lenet5", in_channels=1, input_size=28)
    return save_model(
        model, tmp_path / "m", input_shape=(1, 28, 28), mean=[0.1], std=[0.3], class_names=NAMES
    )


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("input_shape", [3, 28, 28], "has 3 channels but the architecture has in_channels=1"),
        ("class_names", ["a"], "class_names has 1 names but the architecture has num_classes=10"),
        ("std", [0.0], "std must be > 0"),
        ("mean", [1, 2, 3], "mean must be 1 or 1 finite numbers"),
    ],
)
def test_config_that_lies_is_refused(saved, field, value, fragment):
    cfg = json.loads((saved / "config.json").read_text())
    cfg[field] = value
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=fragment):
        load_model(saved)


def test_save_refuses_nan_normalisation(tmp_path):
    model = create_model("lenet5", in_channels=1, input_size=28)
    with pytest.raises(ValueError, match="mean and std must be finite"):
        save_model(
            model,
            tmp_path / "m",
            input_shape=(1, 28, 28),
            mean=[0.1],
            std=[float("nan")],
            class_names=NAMES,
        )
    assert not (tmp_path / "m").exists()
