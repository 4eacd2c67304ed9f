"""Model repositories for the serving tests (helpers live in ``serve_helpers``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from serve_helpers import (
    IN8,
    ONNX_B,
    ONNX_W,
    OUT10,
    make_mlp,
    save_slimtorch,
    slimtorch_export,
    train_digits,
    write_config,
    write_onnx,
)
from slimtorch.models import save_exported


@pytest.fixture(scope="session")
def repo_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo-template")
    # slimtorch model directory with a serving config and two versions
    write_config(
        root / "mlp",
        format="slimtorch",
        inputs=IN8,
        outputs=OUT10,
        max_batch_size=16,
        versions="all",
    )
    save_slimtorch(root / "mlp" / "1", make_mlp(1))
    save_slimtorch(root / "mlp" / "2", make_mlp(2))
    # a slimtorch model directory without a serving config (derived from its config.json)
    save_slimtorch(root / "plain" / "1", make_mlp(3))
    # a torch.export program
    write_config(root / "exported", format="torch_export", inputs=IN8, outputs=OUT10)
    save_exported(make_mlp(4), torch.randn(2, 1, 8, 8), root / "exported" / "1" / "model.pt2")
    # an ONNX graph
    write_config(
        root / "linear",
        format="onnx",
        inputs=[{"name": "x", "datatype": "FP32", "dims": [4]}],
        outputs=[{"name": "y", "datatype": "FP32", "dims": [3]}],
    )
    write_onnx(root / "linear" / "1" / "model.onnx", ONNX_W, ONNX_B)
    return root


@pytest.fixture
def repo(repo_template: Path, tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(repo_template, root)
    return root


@pytest.fixture(scope="session")
def digits_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A lenet5 trained on digits: its model directory and its `slimtorch export` outputs."""
    root = tmp_path_factory.mktemp("digits-model")
    model_dir = train_digits(root / "run")
    return {
        "dir": model_dir,
        "onnx": slimtorch_export(model_dir, root / "model.onnx", "onnx"),
        "pt2": slimtorch_export(model_dir, root / "model.pt2", "pt2"),
    }
