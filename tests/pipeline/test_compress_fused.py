"""compress_run with fuse-tucker: a factorised model becomes fused kernels, same accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slimtorch.decompose import FusedTuckerConv2d
from slimtorch.models import load_model
from slimtorch.pipeline import compress_run
from slimtorch.train import TrainConfig
from slimtorch.train.classifier import train_classifier


@pytest.fixture(scope="module")
def factorised(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("base")
    cfg = TrainConfig(epochs=2, lr=0.05, progress=False)
    train_classifier(model="resnet20", dataset="digits", out_dir=base, train_config=cfg)
    out = tmp_path_factory.mktemp("tucker")
    compress_run(
        in_dir=base,
        out_dir=out,
        method="tucker",
        method_options={"rank": 0.5},
        include=["layer*"],
        exclude=["*shortcut*"],
        finetune=TrainConfig(epochs=1, lr=0.01, progress=False),
        batch_size=64,
        profile_batch=8,
        threads=1,
    )
    return out


def test_fuse_tucker_keeps_accuracy_and_reloads(factorised: Path, tmp_path: Path) -> None:
    res = compress_run(
        in_dir=factorised,
        out_dir=tmp_path,
        method="fuse-tucker",
        method_options={},
        finetune=TrainConfig(epochs=1, lr=0.01, progress=False),
        batch_size=64,
        profile_batch=8,
        threads=1,
    )
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["history"] is None  # a deployment step: never fine-tuned
    rows = report["layers"]["rows"]
    assert len(rows) == 18 and all(r["action"] == "fused" for r in rows)
    assert sum(r["residual"] for r in rows) == 9
    assert "bn1" in report["layers"]["bn_folded"]  # the dense stem's batch norm, folded too
    acc = report["accuracy"]
    assert acc["after_finetune"] == pytest.approx(acc["before"], abs=1e-3)  # the same model
    model, _ = load_model(tmp_path / "model")
    assert sum(isinstance(m, FusedTuckerConv2d) for m in model.modules()) == 18
    x = torch.randn(4, 1, 8, 8)
    res.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), res.model(x))


def test_fuse_tucker_options(factorised: Path) -> None:
    with pytest.raises(ValueError, match="only the option 'fold_bn'"):
        compress_run(in_dir=factorised, out_dir=None, method="fuse-tucker", method_options={"x": 1})
    with pytest.raises(TypeError, match="fold_bn"):
        compress_run(
            in_dir=factorised, out_dir=None, method="fuse-tucker", method_options={"fold_bn": 1}
        )


def test_fuse_tucker_without_tucker_layers_is_refused_before_anything_changes(
    tmp_path: Path,
) -> None:
    from slimtorch.data import load_dataset
    from slimtorch.models import create_model, save_model

    ds = load_dataset("digits", "test")
    save_model(create_model("resnet20", num_classes=10, in_channels=1, input_size=8),
               tmp_path / "plain", input_shape=(1, 8, 8), mean=ds.mean, std=ds.std,
               class_names=list(ds.classes), extra={"dataset": "digits"})  # fmt: skip
    with pytest.raises(ValueError, match="no Tucker-2 layer to fuse; compress with --method"):
        compress_run(in_dir=tmp_path / "plain", out_dir=tmp_path / "out", method="fuse-tucker",
                     profiles=(), threads=1)  # fmt: skip
    assert not (tmp_path / "out" / "model").exists()
