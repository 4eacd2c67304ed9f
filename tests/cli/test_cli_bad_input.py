"""CLI: bad input gives one line naming the bad value and exit status 2, before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slimtorch.cli.main import main


def _with_input_shape(model_dir: Path, dest: Path, shape: list[int]) -> Path:
    """A copy of ``model_dir`` whose config.json records ``shape`` as its input shape."""
    import shutil

    shutil.copytree(model_dir, dest)
    config = json.loads((dest / "config.json").read_text())
    config["input_shape"] = shape
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line a failed command printed on stderr (no traceback, no second line)."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_out_in_the_way_of_a_file_or_folder(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    train = ["train", "--model", "mlp", "--epochs", "1", "--device", "cpu", "--no-progress"]
    assert main([*train, "--out", str(a_file)]) == 2
    assert f"--out {a_file} is a file; give a folder" in _error(capsys)
    assert main([*train, "--out", str(a_file / "run")]) == 2
    assert f"{a_file} is a file, not a folder" in _error(capsys)
    compress = ["compress", "--in", str(model_dir), "--method", "svd", "--device", "cpu"]
    assert main([*compress, "--out", str(a_file)]) == 2
    assert f"--out {a_file} is a file; give a folder" in _error(capsys)
    assert main(["export", "--in", str(model_dir), "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path} is a folder; give the path of the file to write" in _error(capsys)
    assert main(["export", "--in", str(model_dir), "--out", str(a_file / "m.onnx")]) == 2
    assert f"{a_file} is a file, not a folder" in _error(capsys)
    profile = ["profile", "--in", str(model_dir), "--device", "cpu", "--profiles", "rx580"]
    assert main([*profile, "--json", str(tmp_path)]) == 2
    assert f"--json {tmp_path} is a folder" in _error(capsys)
    assert a_file.read_text() == "keep me"


def test_outputs_never_land_in_the_model_being_read(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(model_dir, run / "model")
    (run / "history.json").write_text("{}")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    compress = ["compress", "--method", "fold-bn", "--device", "cpu", "--overwrite"]
    for src, out in (
        (run, run),
        (run / "model", run),
        (run, run / "model"),
        (run, run / "model" / "x"),
    ):
        assert main([*compress, "--in", str(src), "--out", str(out)]) == 2
        assert f"--out {out} would write over the model it reads" in _error(capsys)
    for fmt, name in (("onnx", "m.onnx"), ("pt2", "model.safetensors.pt2")):
        out = run / "model" / name
        assert main(["export", "--in", str(run), "--format", fmt, "--out", str(out)]) == 2
        assert f"--out {out} is inside the model directory {run / 'model'}" in _error(capsys)
    profile = ["profile", "--in", str(run), "--device", "cpu", "--profiles", "rx580"]
    assert main([*profile, "--json", str(run / "model" / "config.json")]) == 2
    assert "is inside the model directory" in _error(capsys)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_empty_or_foreign_outputs_are_refused_before_any_work(
    model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    compress = ["compress", "--in", str(model_dir), "--method", "svd", "--device", "cpu"]
    assert main([*compress, "--out", ""]) == 2
    assert _error(capsys).endswith("--out is empty; give the path to write")
    assert main(["export", "--in", str(model_dir), "--out", ""]) == 2
    assert "--out is empty" in _error(capsys)
    profile = ["profile", "--in", str(model_dir), "--device", "cpu", "--profiles", "rx580"]
    assert main([*profile, "--json", ""]) == 2
    assert "--json is empty" in _error(capsys)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "o" / "model").mkdir(parents=True)
    (tmp_path / "o" / "model" / "notes.txt").write_text("mine")
    assert main([*compress, "--out", str(tmp_path / "o"), "--finetune-epochs", "1"]) == 2
    assert "o/model exists and is not a slimtorch model directory" in _error(capsys)
    assert sorted(p.name for p in (tmp_path / "o").rglob("*")) == ["model", "notes.txt"]


def test_a_diverged_run_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = ["train", "--model", "mlp", "--dataset", "digits", "--device", "cpu", "--no-progress"]
    assert main([*train, "--epochs", "1", "--lr", "1e6", "--out", str(tmp_path / "r")]) == 2
    assert "training diverged at epoch 1" in _error(capsys)


def test_export_refuses_a_suffix_of_the_other_format(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model.pt2"
    assert main(["export", "--in", str(model_dir), "--out", str(out), "--format", "onnx"]) == 2
    assert (
        f"--out {out} names a .pt2 file but --format is onnx; leave --format out (or pass "
        "--format pt2), or give an --out ending in .onnx"
    ) in _error(capsys)
    assert not out.exists()
    out = tmp_path / "model.onnx"
    assert main(["export", "--in", str(model_dir), "--out", str(out), "--format", "pt2"]) == 2
    assert "names a .onnx file but --format is pt2" in _error(capsys)
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sparsity", "0.5"], "--sparsity 0.5 applies only with --sparse; add --sparse"),
        (["--dense-init", "--t-end", "0.5"], "--t-end 0.5, --dense-init apply only with --sparse"),
        (["--distill-alpha", "0.5"], "--distill-alpha 0.5 applies only with --teacher"),
        (["--lr", "inf"], "TrainConfig.lr must be finite, got inf"),
        (["--weight-decay", "inf"], "TrainConfig.weight_decay must be finite, got inf"),
    ],
)
def test_train_refuses_ignored_or_infinite_options(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["train", "--model", "mlp", "--epochs", "1", "--device", "cpu", "--no-progress"]
    assert main([*args, *extra, "--out", str(tmp_path / "run")]) == 2
    assert message in _error(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("method", "extra", "message"),
    [
        ("svd", ["--finetune-epochs", "-1"], "--finetune-epochs must be >= 0, got -1"),
        ("svd", ["--rank", "0.3", "--set", "rank=0.5"], "--rank and --set rank=... both set rank"),
        ("prune", ["--sparsity", "0.3", "--set", "sparsity=0.5"], "both set sparsity"),
        ("nm", ["--set", "n=1", "--set", "n=2"], "--set n is given twice; keep one"),
        (
            "svd",
            ["--speed-on", "rx580"],
            "--speed-on tunes the speed check, which runs only with --min-speedup",
        ),
        (
            "tucker",
            ["--min-speedup", "1", "--speed-compile"],
            "--speed-compile times the whole model; it needs --speed-scope model",
        ),
        (
            "prune",
            ["--sparsity", "0.5", "--gradual", "--finetune-epochs", "0"],
            "--gradual raises the sparsity during fine-tuning; it needs --finetune-epochs >= 1",
        ),
        ("svd", ["--distill-alpha", "0.3"], "--distill-alpha 0.3 applies only with --distill"),
        (
            "svd",
            ["--distill", "--distill-temperature", "inf"],
            "DistillConfig.temperature must be finite, got inf",
        ),
        ("ptq", ["--set", "weight_bits=8.0"], "PTQConfig.weight_bits must be one of 8, 4, got 8.0"),
        (
            "mixed",
            ["--set", "size_ratio=2", "--set", "fold_bn=no"],
            "MixedPrecisionConfig.fold_bn must be True or False, got 'no'",
        ),
        (
            "mixed",
            ["--set", "size_ratio=2", "--set", "dp_bins=100.5"],
            "MixedPrecisionConfig.dp_bins must be an int, got 100.5",
        ),
    ],
)
def test_compress_refuses_conflicting_or_mistyped_options(
    method: str,
    extra: list[str],
    message: str,
    model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["compress", "--in", str(model_dir), "--out", str(tmp_path / "c"), "--method", method]
    assert main([*args, *extra, "--device", "cpu", "--no-progress"]) == 2
    assert message in _error(capsys)
    assert not (tmp_path / "c").exists()


def test_profile_shape_options(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from slimtorch.models import save_exported

    base = ["profile", "--device", "cpu", "--profiles", "rx580"]
    assert main([*base, "--model", "mlp", "--input-shape", "1,28,14"]) == 2
    assert "the zoo models take square images (H == W), got 28x14" in _error(capsys)
    assert main([*base, "--in", str(model_dir), "--input-shape", "3,32,32"]) == 2
    assert "--input-shape 3,32,32 applies to --model and --exported" in _error(capsys)

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    program = save_exported(net, torch.randn(2, 1, 8, 8), tmp_path / "net.pt2")
    capsys.readouterr()
    assert main([*base, "--exported", str(program), "--json", str(tmp_path / "p.json")]) == 0
    assert json.loads((tmp_path / "p.json").read_text())["input_shapes"] == [[1, 1, 8, 8]]
    flat = save_exported(torch.nn.Linear(64, 3), torch.randn(2, 64), tmp_path / "flat.pt2")
    assert main([*base, "--exported", str(flat)]) == 2
    assert _error(capsys) == (
        f"slimtorch profile: error: --exported {flat} has an input of shape ['?', 64], not one "
        "fixed-size image (N, C, H, W); pass the C,H,W to profile with as --input-shape"
    )
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"junk")
    assert main([*base, "--exported", str(junk)]) == 2
    assert "is not a readable torch.export archive" in _error(capsys)
    assert main([*base, "--exported", str(program), "--input-shape", "1,28,28"]) == 2
    err = _error(capsys)
    assert "does not run on inputs of shape (1, 1, 28, 28)" in err and "--input-shape" in err
    assert main([*base, "--exported", str(program), "--input-shape", "1,8,8"]) == 0


def test_a_config_with_a_malformed_input_shape_is_refused_on_load(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = _with_input_shape(model_dir, tmp_path / "broken", [1, 8])
    assert main(["profile", "--in", str(broken), "--device", "cpu", "--profiles", "rx580"]) == 2
    assert "input_shape must be [channels, height, width] >= 1, got [1, 8]" in _error(capsys)


def test_out_of_memory_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import slimtorch.models

    def no_memory(*args: object, **kwargs: object) -> None:
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: "
            "you tried to allocate 51200000000 bytes.\nmore detail"
        )

    monkeypatch.setattr(slimtorch.models, "create_model", no_memory)
    args = ["profile", "--model", "mlp", "--num-classes", "100000000", "--device", "cpu"]
    assert main(args) == 2
    err = _error(capsys)
    assert "out of memory" in err and "51200000000 bytes" in err and "smaller batch" in err


def test_serve_checks_repository_and_device_before_starting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import slimtorch.serve.run

    def started(*args: object, **kwargs: object) -> None:
        raise AssertionError("the server was started")

    monkeypatch.setattr(slimtorch.serve.run, "run_server", started)
    assert main(["serve", "--repository", str(tmp_path / "nope")]) == 2
    assert f"model repository {tmp_path / 'nope'} (from --repository or " in _error(capsys)
    assert main(["serve", "--repository", str(tmp_path), "--device", "cpux"]) == 2
    assert "invalid device 'cpux'" in _error(capsys)


def test_profile_refuses_what_it_cannot_run_or_write(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import os
    import shutil

    broken = _with_input_shape(model_dir, tmp_path / "sizes", [1, 16, 16])  # built for 8x8
    base = ["profile", "--device", "cpu", "--profiles", " rx580 , h100-sxm"]  # spaces are fine
    assert main([*base, "--in", str(broken)]) == 2
    assert "input_shape (1, 16, 16) does not fit mlp's layers" in _error(capsys)
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)  # a model directory that is not the one read
    assert main([*base, "--in", str(model_dir), "--json", str(other / "config.json")]) == 2
    assert f"is inside the model directory {other}" in _error(capsys)
    assert json.loads((other / "config.json").read_text()) == json.loads(
        (model_dir / "config.json").read_text()
    )
    assert main([*base, "--exported", str(tmp_path / "nope.pt2")]) == 2
    assert "nope.pt2 does not exist or is not a file" in _error(capsys)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert main([*base, "--in", str(model_dir), "--json", str(locked / "p.json")]) == 2
        assert f"{locked} is not writable here" in _error(capsys)
    assert main([*base, "--in", str(model_dir)]) == 0


def test_profiles_take_names_all_or_none_never_nothing(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["profile", "--in", str(model_dir), "--device", "cpu"]
    assert main([*base, "--profiles", " , "]) == 2
    assert "names no profile; give names such as rx580, all, or none" in _error(capsys)
    assert main([*base, "--profiles", "rx58O"]) == 2
    assert "rx58O" in _error(capsys)
    out = tmp_path / "p.json"
    assert main([*base, "--profiles", "none", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["estimates"] == {}


def test_eval_checks_the_dataset_against_the_model_before_reading_it(
    model_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import slimtorch.data.resolve as resolve

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("eval tried to download")

    monkeypatch.setattr(resolve, "_download", no_network)
    base = ["eval", "--in", str(model_dir), "--device", "cpu"]
    assert main([*base, "--dataset", "cifar10"]) == 2  # 3-channel, other classes: not fetched
    assert "are not cifar10's" in _error(capsys)
    monkeypatch.setenv("SLIMTORCH_DATA", str(model_dir))  # no mnist files there
    monkeypatch.setenv("XDG_CACHE_HOME", str(model_dir / "cache"))
    assert main([*base, "--dataset", "mnist", "--no-download"]) == 2
    assert "Downloading is off" in capsys.readouterr().err  # the search, listed over lines


def test_profile_of_a_hand_mixed_half_model_names_the_dtypes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # model.half() with the batch norms set back to float32: profile blamed the input shape
    from slimtorch.models import create_model, save_model

    model = create_model("resnet20", in_channels=1, input_size=8).half()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.float()
    save_model(model, tmp_path / "m", input_shape=(1, 8, 8), mean=[0.5], std=[0.5],
               class_names=list("0123456789"))  # fmt: skip
    assert main(["profile", "--in", str(tmp_path / "m"), "--profiles", "none"]) == 2
    err = _error(capsys)
    assert "does not run on float32 inputs" in err and "mix float16, float32" in err
    assert "input_shape" not in err


def test_profile_of_an_onnx_file_says_exported_takes_pt2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # it advised --input-shape, which then failed with "is not a torch.export archive"
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"not read")
    for extra in ([], ["--input-shape", "1,8,8"]):
        assert main(["profile", "--exported", str(onnx_file), *extra]) == 2
        assert _error(capsys) == (
            f"slimtorch profile: error: --exported takes a torch.export program (.pt2), not the "
            f"ONNX file {onnx_file}; profile the model it was exported from with --in"
        )


def test_batch_size_one_on_a_1x1_map_says_what_to_change(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # torch's "Expected more than 1 value per channel when training" alone did not say that
    # batch size 1 cannot train this model's batch norms
    args = ["train", "--model", "vgg11-bn", "--dataset", "digits", "--epochs", "1"]
    args += ["--batch-size", "1", "--out", str(tmp_path / "r"), "--device", "cpu", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Expected more than 1 value per channel when training" in err
    assert "use a --batch-size of 2 or more per process" in err


def test_a_memory_error_is_one_line(
    model_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Python's MemoryError (a gzip buffer, a numpy array) came out as a traceback
    import safetensors.torch

    def no_memory(*args: object, **kwargs: object) -> None:
        raise MemoryError("Unable to allocate output buffer")

    monkeypatch.setattr(safetensors.torch, "load_file", no_memory)
    assert main(["eval", "--in", str(model_dir), "--device", "cpu"]) == 2
    assert _error(capsys).startswith("slimtorch eval: error: out of memory (out of memory reading ")


def test_a_missing_optional_dependency_names_its_extra(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """One line naming the slimtorch[...] extra to install, not a traceback (or, for the
    ONNX exporter's own package, a claim that the model is not exportable)."""
    import sys

    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import fails, find_spec says None
    out = tmp_path / "m.onnx"
    assert main(["export", "--in", str(model_dir), "--format", "onnx", "--out", str(out)]) == 2
    err = _error(capsys)
    assert "ONNX export needs onnxscript" in err and "pip install 'slimtorch[onnx]'" in err
    assert not out.exists()

    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert main(["serve", "--repository", str(tmp_path), "--port", "18089"]) == 2
    assert "pip install 'slimtorch[serve]'" in _error(capsys)

    for name in ("sklearn", "sklearn.datasets"):
        monkeypatch.setitem(sys.modules, name, None)
    train = ["train", "--model", "mlp", "--dataset", "digits", "--epochs", "1", "--no-progress"]
    assert main([*train, "--device", "cpu", "--out", str(tmp_path / "run")]) == 2
    assert "pip install 'slimtorch[data]'" in _error(capsys)


def test_an_import_error_without_a_hint_gets_the_extra() -> None:
    from slimtorch.core.errors import missing_module_message

    exc = ModuleNotFoundError("No module named 'torchao'", name="torchao")
    assert missing_module_message(exc).endswith("pip install 'slimtorch[quant]'")


@pytest.mark.parametrize(
    ("command", "hint"),
    [("train", "rerun the same command with --resume"), ("compress", "does not resume")],
)
def test_an_interrupted_fit_tells_the_user_what_to_do_on_the_command_line(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, command: str, hint: str,
) -> None:  # fmt: skip
    # the message spoke of resume=True (an API argument), and told compress to --resume
    import slimtorch.pipeline
    import slimtorch.train.classifier
    from slimtorch.train import TrainingInterrupted

    def stopped(*args: object, **kwargs: object) -> None:
        raise TrainingInterrupted(
            "stopped by SIGINT after step 3; checkpoint c.pt written",
            " (Trainer.fit(..., resume=True) continues it)",
        )

    monkeypatch.setattr(slimtorch.train.classifier, "train_classifier", stopped)
    monkeypatch.setattr(slimtorch.pipeline, "compress_run", stopped)
    args = {
        "train": ["train", "--model", "mlp", "--epochs", "1", "--no-progress"],
        "compress": ["compress", "--in", str(model_dir), "--method", "svd", "--rank", "0.5"],
    }[command]
    assert main([*args, "--device", "cpu", "--out", str(tmp_path / "run")]) == 130
    err = _error(capsys)
    assert "stopped by SIGINT after step 3; checkpoint c.pt written" in err and hint in err
    assert "resume=True" not in err
