"""Exact checks of the normalisation a saved model records."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimtorch.models import create_model, save_model

NAMES = [str(i) for i in range(10)]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_std_is_refused(tmp_path: Path, bad: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        save_model(create_model("mlp"), tmp_path / "m", input_shape=(1, 28, 28), mean=[0.5],
                   std=[bad], class_names=NAMES)  # fmt: skip
    assert not (tmp_path / "m").exists()
