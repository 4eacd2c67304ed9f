"""CLI on a user's own image folder: train, eval from elsewhere, compress and export read it at
the model's shape and normalisation, and bad folder arguments are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimtorch.cli.main import main

Image = pytest.importorskip("PIL.Image")

CPU = ["--device", "cpu", "--threads", "1"]


@pytest.fixture(scope="module")
def clothes(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """500 training and 200 test images of the real Fashion-MNIST, as PNG class folders."""
    from slimtorch.data import load_dataset

    root = tmp_path_factory.mktemp("folder") / "clothes"
    for split, n in (("train", 500), ("test", 200)):
        ds = load_dataset("fashion-mnist", split, root=shared_data, download=False)
        for i in range(n):
            cls = ds.classes[int(ds.labels[i])].replace("/", "-")  # "T-shirt/top"
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(ds.images[i, 0].numpy()).save(root / split / cls / f"{i}.png")
    return root


def _json(capsys: pytest.CaptureFixture[str]) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_train_eval_compress_export_on_a_folder(
    clothes: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(clothes.parent)
    run = tmp_path / "run"
    train = ["train", "--model", "mlp", "--dataset", "./clothes", "--epochs", "6", "--lr", "0.05"]
    assert main([*train, "--batch-size", "50", "--out", str(run), "--no-progress", *CPU]) == 0
    trained = _json(capsys)
    assert trained["test_accuracy"] > 0.5  # ten classes: chance is 0.1
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["extra"]["dataset"] == str(clothes.resolve())  # found again from anywhere
    assert config["input_shape"] == [1, 28, 28]
    assert config["class_names"][0] == "Ankle boot"  # sorted folder names, not the catalog's

    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--in", str(run), *CPU]) == 0
    evaluated = _json(capsys)
    assert evaluated["n"] == 200
    assert evaluated["accuracy"] == pytest.approx(trained["test_accuracy"], abs=1e-4)

    out = tmp_path / "pruned"
    compress = ["compress", "--in", str(run), "--out", str(out), "--method", "prune"]
    assert main([*compress, "--sparsity", "0.5", "--profiles", "none", *CPU]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["dataset"] == str(clothes.resolve())
    assert report["accuracy"]["before"] == pytest.approx(trained["test_accuracy"], abs=1e-4)

    pytest.importorskip("onnxruntime")
    export = ["export", "--in", str(run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]
    assert main(export) == 0
    exported = _json(capsys)
    assert exported["checked_on"] == f"{clothes.resolve()} test, 64 images"


def test_folder_read_at_another_shape_and_bad_folder_arguments(
    clothes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "rgb"
    train = ["train", "--model", "lenet5", "--dataset", str(clothes), "--epochs", "1"]
    train += ["--channels", "3", "--image-size", "32", "--out", str(run), "--no-progress", *CPU]
    assert main(train) == 0
    capsys.readouterr()
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["input_shape"] == [3, 32, 32]
    assert len(config["mean"]) == 3
    assert main(["eval", "--in", str(run), *CPU]) == 0  # read at 3x32x32 again
    assert _json(capsys)["n"] == 200
    # a resume reads the folder as the run began, or is refused
    resume = [*train, "--resume"]
    resume[resume.index("--epochs") + 1] = "2"
    resume[resume.index("--image-size") + 1] = "36"
    assert main(resume) == 2
    assert "input_shape: [3, 32, 32] then, [3, 36, 36] now" in capsys.readouterr().err

    # a catalog dataset is not resized
    bad = ["train", "--model", "mlp", "--dataset", "digits", "--image-size", "16"]
    assert main([*bad, "--out", str(tmp_path / "d"), *CPU]) == 2
    assert "digits/train images are (1, 8, 8)" in capsys.readouterr().err
    # the model's classes are checked before a single image is read
    assert main(["eval", "--in", str(run), "--dataset", "fashion-mnist", *CPU]) == 2
    assert "are not fashion-mnist's" in capsys.readouterr().err
    # neither a catalog name nor a folder
    with pytest.raises(SystemExit):
        main(["eval", "--in", str(run), "--dataset", "fashon-mnist"])
    assert "or give an image folder's path" in capsys.readouterr().err
    assert main(["eval", "--in", str(run), "--dataset", str(tmp_path / "none"), *CPU]) == 2
    assert "does not exist or is not a folder" in capsys.readouterr().err
