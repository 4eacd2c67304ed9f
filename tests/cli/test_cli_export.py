"""CLI: ``slimtorch export`` writes ONNX (fp32, fp16, int8 Q/DQ) and torch.export programs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from slimtorch.cli.main import main
from slimtorch.pipeline import compress_run
from slimtorch.train import TrainConfig
from slimtorch.train.classifier import train_classifier


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("export")
    cfg = TrainConfig(epochs=3, lr=0.05, progress=False)
    train_classifier(
        model="lenet5", dataset="digits", out_dir=root / "base", train_config=cfg, batch_size=64
    )
    compress_run(
        in_dir=root / "base",
        out_dir=root / "ptq",
        method="ptq",
        method_options={"mode": "static", "calibration_batches": 4, "runtime_check": False},
        profile_batch=4,
        profiles=(),
        threads=1,
    )
    return root / "base", root / "ptq"


def _export(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    capsys.readouterr()
    assert main(["export", *args]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_export_float_int8_and_pt2(
    models: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, ptq = models
    fp32 = _export(capsys, "--in", str(base), "--out", str(tmp_path / "a.onnx"))
    assert fp32["max_abs_diff"] < 1e-3 and not fp32["int8_ops"]
    fp16 = _export(capsys, "--in", str(base), "--out", str(tmp_path / "h.onnx"), "--dtype", "fp16")
    assert fp16["bytes"] < 0.6 * fp32["bytes"]  # type: ignore[operator]
    int8 = _export(capsys, "--in", str(ptq), "--out", str(tmp_path / "q.onnx"))
    assert int8["int8_ops"] and int8["bytes"] < fp32["bytes"]  # type: ignore[operator]
    assert (fp32["precision"], fp16["precision"], int8["precision"]) == (
        "fp32",
        "fp16",
        "int8 Q/DQ",
    )
    # checked on the model's own test images, where int8 ranges were calibrated
    assert int8["checked_on"] == fp32["checked_on"] == "digits test, 64 images"
    assert int8["top1_agreement"] >= 0.95 and fp32["top1_agreement"] == 1.0  # type: ignore[operator]
    pt2 = _export(capsys, "--in", str(base), "--format", "pt2", "--out", str(tmp_path / "m.pt2"))
    assert pt2["max_abs_diff"] < 1e-5 and pt2["top1_agreement"] == 1.0  # type: ignore[operator]


def _card(extra: dict[str, str], shape: tuple[int, int, int]) -> Any:
    """A model card that records ``extra`` (its dataset) and an input shape."""
    from slimtorch.models import ModelCard

    c = shape[0]
    return ModelCard(architecture={"name": "mlp", "kwargs": {}}, transforms=[], input_shape=shape,
                     mean=(0.5,) * c, std=(0.25,) * c, class_names=(), dtype="float32",
                     torch_version="", extra=extra)  # fmt: skip


def test_check_inputs_fall_back_to_random_without_local_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from slimtorch.cli.export_cmd import check_inputs

    monkeypatch.delenv("SLIMTORCH_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    x, what = check_inputs(_card({"dataset": "digits"}, (1, 8, 8)), (1, 8, 8), None)
    assert what == "digits test, 64 images" and tuple(x.shape) == (64, 1, 8, 8)
    # no dataset recorded, files not here (never downloaded), or another input shape
    for extra, root, shape in (
        ({}, None, (1, 8, 8)),
        ({"dataset": "mnist"}, str(tmp_path), (1, 28, 28)),
        ({"dataset": "digits"}, None, (1, 28, 28)),
    ):
        x, what = check_inputs(_card(extra, shape), shape, root)
        assert what == "random normal, 8 inputs" and tuple(x.shape) == (8, *shape)


def test_export_errors(
    models: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = models[0]
    out = str(tmp_path / "x.pt2")
    assert (
        main(["export", "--in", str(base), "--format", "pt2", "--dtype", "fp16", "--out", out]) == 2
    )
    assert "--dtype applies to --format onnx only" in capsys.readouterr().err
    assert main(["export", "--in", str(tmp_path / "none"), "--out", out]) == 2


def test_int8_export_calibrates_from_the_models_dataset(
    models: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, ptq = models
    q = str(tmp_path / "q.onnx")
    assert _export(capsys, "--in", str(ptq), "--out", q)["calibration_batches"] == 8
    none = _export(capsys, "--in", str(ptq), "--out", q, "--calibration-batches", "0")
    assert none["calibration_batches"] == 0 and none["int8_ops"]
    assert "calibration_batches" not in _export(capsys, "--in", str(base), "--out", q)
    assert main(["export", "--in", str(ptq), "--out", q, "--calibration-batches", "-1"]) == 2
    assert "--calibration-batches must be >= 0" in capsys.readouterr().err


def test_damaged_local_data_falls_back_with_a_warning(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    import shutil

    from slimtorch.cli.export_cmd import calibration_batches, check_inputs

    monkeypatch.delenv("SLIMTORCH_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bad = tmp_path / "bad" / "mnist"
    bad.mkdir(parents=True)
    for f in (shared_data / "mnist").iterdir():
        shutil.copy(f, bad / f.name)
    for f in bad.iterdir():  # truncated: a checksum error, not a missing file
        f.write_bytes(f.read_bytes()[:1000])
    card = _card({"dataset": "mnist"}, (1, 28, 28))
    with caplog.at_level("WARNING", logger="slimtorch.cli.export_cmd"):
        x, what = check_inputs(card, (1, 28, 28), str(tmp_path / "bad"))
        assert calibration_batches(card, 2, str(tmp_path / "bad")) is None
    assert what == "random normal, 8 inputs" and tuple(x.shape) == (8, 1, 28, 28)
    assert "the mnist test split cannot be read" in caplog.text
    assert "no readable local mnist training data" in caplog.text


def test_calibration_needs_a_recorded_dataset_and_local_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from slimtorch.cli.export_cmd import calibration_batches

    assert calibration_batches(_card({}, (1, 28, 28)), 4, None) is None
    monkeypatch.delenv("SLIMTORCH_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    missing = _card({"dataset": "mnist"}, (1, 28, 28))
    assert calibration_batches(missing, 4, str(tmp_path)) is None  # never downloads
    batches = calibration_batches(_card({"dataset": "digits"}, (1, 8, 8)), 3, None)
    assert batches is not None and len(batches) == 3 and batches[0].shape[0] == 64


def test_int8_export_runs_the_narrow_stem_as_asked(
    models: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ptq = str(models[1])
    q = str(tmp_path / "q.onnx")
    as_int8 = _export(capsys, "--in", ptq, "--out", q, "--narrow-convs", "int8")
    as_float = _export(capsys, "--in", ptq, "--out", q, "--narrow-convs", "float", "--batch", "4")
    # lenet5's one-channel stem is a QLinearConv only when it runs int8
    assert as_int8["int8_ops"]["QLinearConv"] == as_float["int8_ops"]["QLinearConv"] + 1  # type: ignore[index]
    assert as_float["max_abs_diff"] < 0.5  # type: ignore[operator]
    assert main(["export", "--in", ptq, "--out", q, "--batch", "0"]) == 2
    assert "--batch must be >= 1" in capsys.readouterr().err


def test_profile_says_when_int8_is_simulated(
    models: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    outputs = []
    for folder in models:
        capsys.readouterr()
        assert main(["profile", "--in", str(folder), "--batch-size", "2", "--threads", "1"]) == 0
        outputs.append(capsys.readouterr().out)
    base_out, ptq_out = outputs
    assert "simulated in float" not in base_out
    assert "simulated in float" in ptq_out and "--format onnx" in ptq_out


def test_a_failed_check_keeps_the_earlier_export(
    models: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import slimtorch.quant

    base = models[0]
    out = tmp_path / "m.onnx"
    _export(capsys, "--in", str(base), "--out", str(out))
    earlier = out.read_bytes()

    def broken(*args: object, **kwargs: object) -> dict[str, float]:
        raise ValueError("ONNX Runtime could not run the file")

    monkeypatch.setattr(slimtorch.quant, "check_onnx", broken)
    assert main(["export", "--in", str(base), "--out", str(out), "--dtype", "fp16"]) == 2
    err = capsys.readouterr().err
    assert "did not pass its check and was removed (the file already there is unchanged)" in err
    assert out.read_bytes() == earlier and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    # a new path that fails its check is not written at all
    assert main(["export", "--in", str(base), "--out", str(tmp_path / "n.onnx")]) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    monkeypatch.undo()
    pt2 = tmp_path / "m.pt2"  # the program is checked under its temporary name, then renamed
    assert _export(capsys, "--in", str(base), "--out", str(pt2))["top1_agreement"] == 1.0
    from slimtorch.models import load_exported

    assert load_exported(pt2) is not None


def test_an_interrupted_export_is_not_called_a_failed_check_and_its_leftovers_are_swept(
    models: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a SIGTERM'd export left its complete but unchecked file beside --out, for good; a Ctrl-C
    # was reported as "did not pass its check"
    import slimtorch.quant

    base = models[0]
    out = tmp_path / "m.onnx"
    killed = tmp_path / ".m.onnx.999999999.0123abcd.tmp"  # a dead process's export folder
    killed.mkdir()
    (killed / "m.onnx").write_bytes(b"unchecked")

    def interrupted(*args: object, **kwargs: object) -> dict[str, float]:
        raise KeyboardInterrupt

    monkeypatch.setattr(slimtorch.quant, "check_onnx", interrupted)
    assert main(["export", "--in", str(base), "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "did not pass its check" not in err and "interrupted" in err
    assert list(tmp_path.iterdir()) == []  # neither the unchecked file nor the killed one's


def test_weight_only_int8_export_says_so_and_reads_no_calibration_data(
    models: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = models[0]
    compress_run(
        in_dir=base,
        out_dir=tmp_path / "wo",
        method="ptq",
        method_options={"mode": "weight_only", "runtime_check": False},
        profile_batch=4,
        profiles=(),
        threads=1,
    )
    out = _export(capsys, "--in", str(tmp_path / "wo"), "--out", str(tmp_path / "w.onnx"))
    assert out["precision"] == "int8 weights (Q/DQ), float activations"
    assert "calibration_batches" not in out and out["int8_ops"] == {}


def test_an_export_that_disagrees_with_the_model_is_not_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # the check only reported: an ONNX file agreeing on 3% of inputs replaced the earlier
    # export and the command exited 0; the pt2 check failed with a raw traceback
    import torch
    from torch import nn

    from slimtorch.models import MODELS, create_model, register_model, save_model

    class BatchBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(16, 10), nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.flatten(x, 1)
            return self.a(x) if x.shape[0] > 4 else self.b(x)

    monkeypatch.setattr(MODELS, "_items", dict(MODELS._items))
    register_model("test-only-batch-branch")(
        lambda *, num_classes=10, in_channels=1, input_size=4: BatchBranch()
    )
    torch.manual_seed(0)
    model = create_model("test-only-batch-branch", input_size=4)
    src = save_model(model, tmp_path / "m", input_shape=(1, 4, 4), mean=[0.5], std=[0.5],
                     class_names=[str(i) for i in range(10)])  # fmt: skip
    out = tmp_path / "x.onnx"
    out.write_bytes(b"earlier export")
    assert main(["export", "--in", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "the export disagrees with the model on random normal, 8 inputs: top-1" in err
    assert out.read_bytes() == b"earlier export"
    assert main(["export", "--in", str(src), "--out", str(out), "--min-agreement", "0"]) == 0
    assert main(["export", "--in", str(src), "--out", str(tmp_path / "x.pt2")]) == 2
    assert "the exported program fails on random normal, 8 inputs" in capsys.readouterr().err
    assert not (tmp_path / "x.pt2").exists()


def test_export_makes_a_missing_parent_folder_as_train_and_compress_do(
    models: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # it failed after loading the model, naming an internal temporary file
    out = tmp_path / "nodir" / "sub" / "m.onnx"
    assert _export(capsys, "--in", str(models[0]), "--out", str(out))["out"] == str(out)
    assert out.is_file() and [p.name for p in out.parent.iterdir()] == ["m.onnx"]
