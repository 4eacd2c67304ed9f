"""The CLI end to end: help, one-line errors with choices, train -> eval -> profile on digits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimtorch.cli.common import DATASETS, MODELS, NARROW_CONVS, format_table, parse_shape
from slimtorch.cli.main import main


def test_static_choices_match_registries() -> None:
    from slimtorch.data import list_datasets
    from slimtorch.models import list_models
    from slimtorch.quant.ort_graph import NARROW_CONV_MODES

    assert sorted(MODELS) == sorted(list_models())
    assert set(DATASETS) <= set(list_datasets())
    assert NARROW_CONVS == NARROW_CONV_MODES


@pytest.mark.parametrize("command", ["train", "eval", "compress", "export", "profile", "devices"])
def test_help_on_every_command(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert f"usage: slimtorch {command}" in capsys.readouterr().out


@pytest.mark.parametrize("module", ["slimtorch", "slimtorch.cli"])
def test_python_dash_m_runs_the_command(module: str) -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "usage: slimtorch" in out.stdout and "compress" in out.stdout


def test_bad_choice_is_one_line_listing_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", "--model", "resnet9000", "--out", "x"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "resnet9000" in err and "resnet20" in err and "lenet5" in err


def test_unknown_profile_lists_choices(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["profile", "--model", "mlp", "--profiles", "rx581", "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert "rx581" in err and "rx580" in err


def test_parse_shape_and_table() -> None:
    assert parse_shape("3,32,32") == (3, 32, 32)
    with pytest.raises(ValueError, match="C,H,W"):
        parse_shape("3,32")
    table = format_table(["a", "bb"], [[1, "xyz"]]).splitlines()
    assert table == ["a  bb", "-  ---", "1  xyz"]


def test_train_eval_profile_on_digits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    args = ["train", "--model", "mlp", "--dataset", "digits", "--epochs", "8", "--lr", "0.05"]
    code = main(
        [*args, "--batch-size", "64", "--device", "cpu", "--out", str(out), "--no-progress"]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["test_accuracy"] > 0.85
    for name in ("model/model.safetensors", "model/config.json", "model/metrics.json"):
        assert (out / name).is_file(), name
    assert (out / "checkpoint.pt").is_file()

    assert main(["eval", "--in", str(out), "--device", "cpu"]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-4)
    assert ev["n"] == 359  # the digits test split: 20% of 1797, stratified

    js = tmp_path / "profile.json"
    args = ["profile", "--in", str(out), "--device", "cpu", "--threads", "1"]
    assert main([*args, "--profiles", "rx580,h100-sxm", "--json", str(js)]) == 0
    table = capsys.readouterr().out
    assert "rx580" in table and "h100-sxm" in table
    data = json.loads(js.read_text())
    # mlp on 8x8: 64*256+256 + 256*128+128 + 128*10+10 parameters
    assert json.dumps(data).count(str(64 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10)) >= 1

    # compress with the accuracy guard: a rank that loses too much is refused, exit status 3
    comp = ["compress", "--in", str(out), "--method", "svd", "--rank", "0.02", "--device", "cpu",
            "--profile-batch", "4", "--profiles", "rx580", "--finetune-epochs", "0",
            "--no-progress"]  # fmt: skip
    assert main([*comp, "--out", str(tmp_path / "g"), "--max-drop", "0.5"]) == 3
    captured = capsys.readouterr()
    assert "accuracy guard" in captured.err and "not written" in captured.err
    assert "-> refused: not written" in captured.out and "/g/model" not in captured.out
    assert not (tmp_path / "g" / "model").exists() and (tmp_path / "g" / "report.json").is_file()
    # without the guard the model is written, and the table says what was lost and why
    assert main([*comp, "--out", str(tmp_path / "n")]) == 0
    assert "nothing was fine-tuned: --finetune-epochs" in capsys.readouterr().out
    assert (tmp_path / "n" / "model" / "config.json").is_file()


def test_eval_missing_directory_is_clear(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", "--in", str(tmp_path / "nope"), "--device", "cpu"]) == 2
    assert "nope" in capsys.readouterr().err


def test_profile_a_users_exported_program(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch
    from torch import nn

    from slimtorch.models import save_exported

    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 2))
    path = tmp_path / "mine.pt2"
    save_exported(net.eval(), torch.randn(2, 3, 8, 8), path)
    args = ["profile", "--exported", str(path), "--input-shape", "3,8,8", "--batch-size", "2"]
    assert (
        main([*args, "--device", "cpu", "--profiles", "rx580", "--json", str(tmp_path / "p.json")])
        == 0
    )
    assert "rx580" in capsys.readouterr().out
    data = json.loads((tmp_path / "p.json").read_text())
    assert str(4 * 3 * 9 + 4 + 256 * 2 + 2) in json.dumps(data)  # parameter count of the program


def test_compress_distill_flags_reach_compress_run(
    model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from types import SimpleNamespace

    import slimtorch.pipeline
    from slimtorch.cli.main import build_parser
    from slimtorch.distill import DistillConfig

    base = ["compress", "--in", str(model_dir), "--out", str(tmp_path / "b"), "--method", "svd"]
    args = build_parser().parse_args(base)
    assert args.distill is False
    seen: dict[str, object] = {}

    def fake_run(**kwargs: object) -> SimpleNamespace:
        seen.update(kwargs)
        return SimpleNamespace(report={"layers": {"layers": []}}, table="table")

    monkeypatch.setattr(slimtorch.pipeline, "compress_run", fake_run)
    flags = ["--distill", "--distill-temperature", "3", "--distill-alpha", "0.5"]
    assert main([*base, *flags, "--device", "cpu"]) == 0
    assert seen["distill"] == DistillConfig(temperature=3.0, alpha=0.5)
    assert main([*base, "--device", "cpu"]) == 0
    assert seen["distill"] is None
    assert main([*base, "--distill", "--distill-alpha", "2", "--device", "cpu"]) == 2
    assert "DistillConfig.alpha must be in [0.0, 1.0], got 2.0" in capsys.readouterr().err


def test_compress_speed_scope_flags_reach_the_method_options(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    import slimtorch.pipeline

    seen: dict[str, object] = {}

    def fake_run(**kwargs: object) -> SimpleNamespace:
        seen.update(kwargs)
        return SimpleNamespace(report={"layers": {"layers": []}}, table="table")

    monkeypatch.setattr(slimtorch.pipeline, "compress_run", fake_run)
    base = ["compress", "--in", str(model_dir), "--out", str(tmp_path / "b"), "--method", "tucker"]
    base += ["--device", "cpu"]
    assert main([*base, "--min-speedup", "1.05", "--speed-scope", "model", "--speed-compile"]) == 0
    options = seen["method_options"]
    assert isinstance(options, dict)
    assert options["speed_scope"] == "model" and options["speed_compile"] is True
    assert main(base) == 0
    options = seen["method_options"]
    assert isinstance(options, dict) and "speed_scope" not in options


def test_train_with_teacher_distils_and_checks_the_teacher(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from slimtorch.data import DeviceLoader, load_dataset
    from slimtorch.models import create_model, load_model, save_model

    torch.manual_seed(3)
    teacher = create_model("mlp", num_classes=10, in_channels=1, input_size=8)
    ds = load_dataset("digits", "test")
    names = list(ds.classes)
    card = {"input_shape": (1, 8, 8), "mean": ds.mean, "std": ds.std}
    save_model(teacher, tmp_path / "t", class_names=names, **card)  # type: ignore[arg-type]
    out = tmp_path / "s"
    args = ["train", "--model", "mlp", "--epochs", "15", "--lr", "0.05", "--batch-size", "64"]
    args += ["--device", "cpu", "--no-progress", "--out", str(out)]
    kd = ["--teacher", str(tmp_path / "t"), "--distill-alpha", "1", "--distill-temperature", "1"]
    assert main([*args, *kd]) == 0
    capsys.readouterr()
    # alpha=1: the student learns the (untrained) teacher's answers, not the labels
    student, _ = load_model(out / "model")
    teacher.eval()
    x = next(iter(DeviceLoader(ds, 1024)))[0]  # normalised test images
    with torch.no_grad():
        agree = (student(x).argmax(1) == teacher(x).argmax(1)).float().mean().item()
        labels = (teacher(x).argmax(1) == ds.labels).float().mean().item()
    # a student fitted to the labels would agree with this teacher about as often as the labels do
    assert agree > 0.5 and labels < 0.2, (agree, labels)

    wrong = create_model("mlp", num_classes=3, in_channels=1, input_size=8)
    save_model(wrong, tmp_path / "w", class_names=names[:3], **card)  # type: ignore[arg-type]
    assert main([*args, "--overwrite", "--teacher", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "it predicts 3 classes, the data has 10" in err


def test_library_internals_are_quiet_unless_verbose() -> None:
    import logging

    from slimtorch.cli.main import QUIET_LOGGERS

    assert main(["devices"]) == 0
    assert all(logging.getLogger(n).level == logging.ERROR for n in QUIET_LOGGERS)
    assert not logging.getLogger("torchao.kernel.intmm").isEnabledFor(logging.WARNING)
    assert main(["-v", "devices"]) == 0
    assert all(logging.getLogger(n).level == logging.NOTSET for n in QUIET_LOGGERS)
    logging.getLogger("slimtorch").setLevel(logging.NOTSET)


def test_eval_normalises_as_the_model_was_trained_and_refuses_other_classes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from slimtorch.data import load_dataset
    from slimtorch.models import create_model, save_model

    torch.manual_seed(0)
    net = create_model("mlp", num_classes=10, in_channels=1, input_size=8).eval()
    names = [str(i) for i in range(10)]
    kw = dict(input_shape=(1, 8, 8), mean=[0.3], std=[0.2], extra={"dataset": "digits"})
    save_model(net, tmp_path / "m", class_names=names, **kw)  # type: ignore[arg-type]
    assert main(["eval", "--in", str(tmp_path / "m"), "--device", "cpu"]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ds = load_dataset("digits", "test")
    with torch.no_grad():  # the model's own normalisation, not the dataset's
        logits = net((ds.images.float() / 255 - 0.3) / 0.2)
    assert ev["loss"] == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, ds.labels)), abs=1e-4
    )
    save_model(net, tmp_path / "o", class_names=list("abcdefghij"), **kw)  # type: ignore[arg-type]
    assert main(["eval", "--in", str(tmp_path / "o"), "--device", "cpu"]) == 2
    assert "the model's classes (a, b, c, d, ...) are not digits's" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text", ["mnist", "digits", "mnsit", "./here", "sub/dir", "there", "mnist/", "~"]
)
def test_dataset_option_agrees_with_the_data_layer(
    text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--dataset is checked without importing the data layer; both draw the same line."""
    import argparse

    from slimtorch.cli.common import dataset_arg
    from slimtorch.data import is_image_folder, list_datasets

    monkeypatch.chdir(tmp_path)
    (tmp_path / "there").mkdir()
    expected = text in list_datasets() or is_image_folder(text)
    try:
        assert dataset_arg(text) == text and expected
    except argparse.ArgumentTypeError:
        assert not expected


_USER_MODULE = """
from torch import nn
from slimtorch.models import register_model


@register_model("test-only-cli-user")
def build(*, num_classes=10, in_channels=1, input_size=8, width=16):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * input_size**2, width), nn.ReLU(),
                         nn.Linear(width, num_classes))
"""


def test_models_registered_by_the_users_module_load_with_import(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # the load error said "import the module that registers the model", which no command could
    import sys

    from slimtorch.cli.main import import_user_modules
    from slimtorch.models import MODELS as REGISTRY
    from slimtorch.models import create_model, save_model

    builtin = dict(REGISTRY._items)
    (tmp_path / "usermodels.py").write_text(_USER_MODULE)
    monkeypatch.setattr(REGISTRY, "_items", dict(builtin))
    import_user_modules([str(tmp_path / "usermodels.py")])
    model = create_model("test-only-cli-user", input_size=8, width=24)
    save_model(model, tmp_path / "m", input_shape=(1, 8, 8), mean=[0.5], std=[0.5],
               class_names=[str(i) for i in range(10)])  # fmt: skip
    monkeypatch.setattr(REGISTRY, "_items", dict(builtin))  # a fresh process: not registered
    monkeypatch.delitem(sys.modules, "usermodels")
    assert main(["profile", "--in", str(tmp_path / "m")]) == 2
    assert "slimtorch --import MODULE" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    for how in (["--import", "usermodels"], ["--import", str(tmp_path / "usermodels.py")]):
        monkeypatch.setattr(REGISTRY, "_items", dict(builtin))
        monkeypatch.delitem(sys.modules, "usermodels", raising=False)
        assert main([*how, "profile", "--in", "m", "--json", "p.json"]) == 0
        assert json.loads((tmp_path / "p.json").read_text())["params"] == 64 * 24 + 24 + 250
    monkeypatch.setattr(REGISTRY, "_items", dict(builtin))
    monkeypatch.delitem(sys.modules, "usermodels", raising=False)
    monkeypatch.setenv("SLIMTORCH_IMPORT", "usermodels")
    assert main(["profile", "--in", "m"]) == 0
    # the same module by name and by file: imported once, not registered twice
    monkeypatch.setattr(REGISTRY, "_items", dict(builtin))
    monkeypatch.delitem(sys.modules, "usermodels", raising=False)
    assert main(["--import", str(tmp_path / "usermodels.py"), "profile", "--in", "m"]) == 0
    capsys.readouterr()
    assert main(["--import", "no_such_module_here", "devices"]) == 2
    assert "--import no_such_module_here: ModuleNotFoundError" in capsys.readouterr().err
    # its models are --model choices too (they were refused as "invalid choice")
    monkeypatch.setattr(REGISTRY, "_items", dict(builtin))
    monkeypatch.delitem(sys.modules, "usermodels", raising=False)
    args = ["--import", "usermodels", "train", "--model", "test-only-cli-user", "--dataset"]
    args += ["digits", "--epochs", "1", "--out", "t", "--device", "cpu"]
    assert main(args) == 0
    assert (
        json.loads((tmp_path / "t" / "model" / "config.json").read_text())["architecture"]["name"]
        == "test-only-cli-user"
    )
    monkeypatch.setattr(REGISTRY, "_items", dict(builtin))
    monkeypatch.delitem(sys.modules, "usermodels", raising=False)
    monkeypatch.delenv("SLIMTORCH_IMPORT")
    with pytest.raises(SystemExit):  # not imported: not a choice
        main(["profile", "--model", "test-only-cli-user"])
    assert "invalid choice: 'test-only-cli-user'" in capsys.readouterr().err
