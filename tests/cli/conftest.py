"""Fixtures of the command-line tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained mlp saved for the bundled digits (1x8x8 images, 10 classes)."""
    from slimtorch.data import load_dataset
    from slimtorch.models import create_model, save_model

    ds = load_dataset("digits", "test")
    path = tmp_path_factory.mktemp("cli") / "mlp"
    save_model(
        create_model("mlp", num_classes=10, in_channels=1, input_size=8),
        path,
        input_shape=(1, 8, 8),
        mean=ds.mean,
        std=ds.std,
        class_names=list(ds.classes),
        extra={"dataset": "digits"},
    )
    return path
