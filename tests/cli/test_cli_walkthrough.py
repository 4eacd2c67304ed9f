"""CLI: what a user walking through the commands met (flag names in messages, runs kept,
help that says where files go, summary lines, export formats, quiet autotuning, split labels)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from slimtorch.cli.main import main

TRAIN = ["train", "--model", "mlp", "--dataset", "digits", "--lr", "0.05", "--batch-size", "64"]
TRAIN += ["--device", "cpu", "--threads", "1"]


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line a failed command printed on stderr."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_missing_data_names_the_command_line_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("SLIMTORCH_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    args = ["train", "--model", "mlp", "--dataset", "kmnist", "--no-download", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slimtorch train: error: dataset 'kmnist' (split 'train') not found.")
    assert "\nDownloading is off (download=False / --no-download).\n" in err
    assert err.rstrip().endswith(
        "(or pass root=<folder> / --data-root <folder>), or allow the download "
        "(download=True / leave out --no-download)."
    )


@pytest.mark.parametrize("command", ["compress", "eval", "export", "profile"])
def test_in_that_holds_no_model_is_named_as_the_option(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = {
        "compress": ["--out", str(tmp_path / "c"), "--method", "svd", "--device", "cpu"],
        "eval": ["--device", "cpu"],
        "export": ["--out", str(tmp_path / "x.onnx")],
        "profile": ["--device", "cpu", "--profiles", "rx580"],
    }[command]
    what = "a model directory, or the --out folder of slimtorch train or slimtorch compress"
    nope, empty, a_file = tmp_path / "nope", tmp_path / "empty", tmp_path / "f.txt"
    empty.mkdir()
    a_file.write_text("x")
    for path, problem in (
        (nope, "does not exist"),
        (a_file, "is a file"),
        (empty, "holds no slimtorch model (no config.json in it or in its model/ folder)"),
    ):
        assert main([command, "--in", str(path), *extra]) == 2
        assert _error(capsys) == f"slimtorch {command}: error: --in {path} {problem}; pass {what}"
    assert not (tmp_path / "c").exists() and not (tmp_path / "x.onnx").exists()


def test_train_teacher_that_does_not_exist(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [*TRAIN, "--out", str(tmp_path / "s"), "--teacher", str(tmp_path / "t")]
    assert main(args) == 2
    assert f"--teacher {tmp_path / 't'} does not exist; pass a model directory" in _error(capsys)
    assert not (tmp_path / "s").exists()


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_train_keeps_a_run_unless_resume_or_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    run = [*TRAIN, "--no-progress", "--out", str(out)]
    assert main([*run, "--epochs", "1"]) == 0
    before = _files(out)
    capsys.readouterr()

    assert main([*run, "--epochs", "1", "--seed", "1"]) == 2
    assert _error(capsys) == (
        f"slimtorch train: error: --out {out} already holds a model (model/) and a training "
        "checkpoint (checkpoint.pt); pass --resume to continue that run, --overwrite to replace "
        "it, or choose another --out"
    )
    assert _files(out) == before  # nothing touched
    assert main([*run, "--epochs", "1", "--resume", "--overwrite"]) == 2
    assert "--resume continues the run in --out and --overwrite replaces it" in _error(capsys)

    assert main([*run, "--epochs", "2", "--resume"]) == 0  # continues: one more epoch
    assert json.loads((out / "history.json").read_text())["epoch"] == [1, 2]
    (out / "report.json").write_text("{}")  # a file of an earlier compress into this folder
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main([*run, "--epochs", "1", "--seed", "1", "--overwrite"]) == 0  # a new run
    assert json.loads((out / "history.json").read_text())["epoch"] == [1]
    after = _files(out)
    assert after["model/model.safetensors"] != before["model/model.safetensors"]
    printed = capsys.readouterr()
    assert "removed from the replaced run: report.json" in printed.err
    assert len(printed.out.strip().splitlines()) == 1  # stdout: the JSON summary alone
    json.loads(printed.out)
    assert not (out / "report.json").exists() and (out / "notes.txt").read_text() == "mine"
    assert {"checkpoint.pt", "history.json", "train_config.json"} <= set(after)

    # a checkpoint alone, or a model alone, is a run too; --resume needs the checkpoint
    (out / "model" / "config.json").unlink()  # no longer a model: refused before training
    assert main([*run, "--epochs", "1", "--overwrite"]) == 2
    assert "model exists and is not a slimtorch model directory" in _error(capsys)
    for name in ("model.safetensors", "metrics.json"):
        (out / "model" / name).unlink(missing_ok=True)
    (out / "model").rmdir()
    assert main([*run, "--epochs", "1"]) == 2
    assert "already holds a training checkpoint (checkpoint.pt); pass --resume" in _error(capsys)
    other = tmp_path / "model-only"
    (other / "model").mkdir(parents=True)
    (other / "model" / "config.json").write_text("{}")
    run = [*TRAIN, "--no-progress", "--epochs", "1", "--out", str(other)]
    assert main(run) == 2
    assert f"--out {other} already holds a model (model/); pass --resume" in _error(capsys)
    assert main([*run, "--resume"]) == 2
    assert _error(capsys) == (
        f"slimtorch train: error: --resume: --out {other} holds no checkpoint.pt to "
        "continue from; rerun without --resume, with --overwrite, to train a new model there, "
        "or choose another --out"
    )


def test_compress_keeps_a_model_unless_overwrite(
    model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import shutil

    import slimtorch.pipeline
    from slimtorch.core.io import atomic_write_json

    calls: list[object] = []

    def fake_run(**kwargs: object) -> SimpleNamespace:
        calls.append(kwargs["out_dir"])
        atomic_write_json(Path(str(kwargs["out_dir"])) / "report.json", {"new": True})
        return SimpleNamespace(report={"layers": {"layers": []}}, table="table")

    monkeypatch.setattr(slimtorch.pipeline, "compress_run", fake_run)
    out = tmp_path / "c"
    args = ["compress", "--in", str(model_dir), "--out", str(out), "--method", "svd"]
    args += ["--device", "cpu"]
    assert main(args) == 0  # nothing there yet
    shutil.copytree(model_dir, out / "model")
    capsys.readouterr()
    assert main(args) == 2
    assert _error(capsys) == (
        f"slimtorch compress: error: --out {out} already holds a model (model/); pass "
        "--overwrite to replace it, or choose another --out"
    )
    refused = ("checkpoint.refused.pt", "history.refused.json", "train_config.refused.json")
    for stale in ("history.json", "checkpoint.pt", "report.refused.json", *refused):
        (out / stale).write_text("old run")
    assert main([*args, "--overwrite"]) == 0
    assert calls == [str(out), str(out)]
    # the replaced run's fine-tune and refusal files go (a refused run's fine-tune files too);
    # the new report stays
    removed = (
        "checkpoint.pt, history.json, report.refused.json, checkpoint.refused.pt, "
        "history.refused.json, train_config.refused.json"
    )
    assert f"removed from the replaced run: {removed}" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [".slimtorch-run", "model", "report.json"]
    assert json.loads((out / "report.json").read_text()) == {"new": True}


def test_help_says_what_each_command_writes(capsys: pytest.CaptureFixture[str]) -> None:
    def help_text(command: str) -> str:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        return " ".join(capsys.readouterr().out.split())

    train = help_text("train")
    assert "Writes the model directory --out/model (model.safetensors, config.json, " in train
    assert "metrics.json; " in train and "to --out" not in train
    assert "in --out, history.json (per-epoch figures), train_config.json and a resumable " in train
    assert "--overwrite replace the run --out already holds" in train
    compress = help_text("compress")
    assert "Writes --out/model (a loadable model directory), and in --out report.json and " in (
        compress
    )
    assert "--overwrite replace the model (and reports) --out already holds" in compress
    assert "Writes nothing." in help_text("eval")
    assert "Writes that one file and prints one JSON line." in help_text("export")


@pytest.mark.parametrize(
    "command", ["train", "eval", "compress", "export", "profile", "serve", "devices"]
)
def test_every_command_help_has_a_description(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    between = out.split("\n\n")[1]  # usage, then the description, then the options
    assert not between.startswith("options:") and len(between) > 40, out


def test_train_writes_what_its_help_lists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main([*TRAIN, "--epochs", "1", "--no-progress", "--out", str(out)]) == 0
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    run = sorted(p.name for p in out.iterdir())
    model = sorted(p.name for p in (out / "model").iterdir())
    assert run == [".slimtorch-run", "checkpoint.pt", "history.json", "model", "train_config.json"]
    assert model == ["config.json", "metrics.json", "model.safetensors"]
    listed = text.split("--out/model (", 1)[1].split(")", 1)[0]  # the model directory's files
    assert sorted(listed.replace(";", ",").split(", ")[:3]) == model
    assert all(f" {name}" in text.split("--out/model", 1)[1] for name in run if name != "model")


def test_summary_mentions_skips_only_when_there_are_some() -> None:
    from slimtorch.cli.compress_cmd import _summary

    gemm = {"layers": [{"action": "direct+pool"}, {"action": "gemm"}]}
    assert _summary(gemm) == "layers changed: 2 of 2"
    svd = {"layers": [{"action": "skipped"}, {"action": "decomposed"}, {"action": "kept"}]}
    assert _summary(svd) == "layers changed: 1 of 3 (see report.txt for the 2 left unchanged)"
    groups = {"groups": [{"action": "pruned"}, {"action": "fixed"}]}
    assert _summary(groups) == "channel groups changed: 1 of 2 (see report.txt for the 1 left " + (
        "unchanged)"
    )
    assert _summary({"layers": ["a", "b"], "skipped": {}}) == "layers changed: 2 of 2"
    assert _summary({"layers": ["a"], "skipped": {"b": "why"}}) == (
        "layers changed: 1 of 2 (see report.txt for the 1 left unchanged)"
    )


def test_export_format_follows_the_suffix(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from slimtorch.models import load_exported

    out = tmp_path / "m.pt2"
    capsys.readouterr()
    assert main(["export", "--in", str(model_dir), "--out", str(out), "--no-check"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["format"] == "pt2" and "dtype" not in result
    load_exported(out)  # a torch.export program, not ONNX
    onnx = tmp_path / "m.onnx"
    assert main(["export", "--in", str(model_dir), "--out", str(onnx), "--format", "pt2"]) == 2
    assert f"--out {onnx} names a .onnx file but --format is pt2; leave --format out" in (
        _error(capsys)
    )
    assert not onnx.exists()


def test_compress_holds_back_the_autotune_report_unless_verbose(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch._inductor import config

    import slimtorch.pipeline

    seen: list[tuple[object, object]] = []

    def fake_run(**kwargs: object) -> SimpleNamespace:
        seen.append(
            (config.max_autotune_report_choices_stats, config.autotune_num_choices_displayed)
        )
        return SimpleNamespace(report={"layers": {"layers": []}}, table="table")

    monkeypatch.setattr(slimtorch.pipeline, "compress_run", fake_run)
    defaults = (config.max_autotune_report_choices_stats, config.autotune_num_choices_displayed)
    args = ["compress", "--in", str(model_dir), "--out", str(tmp_path / "c"), "--device", "cpu"]
    assert main([*args, "--method", "conv-gemm"]) == 0
    assert main(["-v", *args, "--method", "conv-gemm"]) == 0
    assert seen == [(False, 0), defaults]
    assert (config.max_autotune_report_choices_stats, config.autotune_num_choices_displayed) == (
        defaults
    )
    logging.getLogger("slimtorch").setLevel(logging.NOTSET)


def test_per_epoch_evaluation_is_labelled_with_its_split(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    def epoch_lines() -> tuple[list[str], list[str]]:
        logged = [r.getMessage() for r in caplog.records if r.name == "slimtorch.train.trainer"]
        caplog.clear()
        bar = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("epoch 1/1 ")]
        return [m for m in logged if m.startswith("epoch 1/1: ")], bar

    # (with the progress bar on, the epoch line is debug-level: the bar shows the figures)
    caplog.set_level(logging.DEBUG, logger="slimtorch")
    assert main(["--verbose", *TRAIN, "--epochs", "1", "--out", str(tmp_path / "t")]) == 0
    logged, bar = epoch_lines()
    # no --val-fraction: the per-epoch figures are the test split's
    assert len(logged) == 1 and "  test_loss " in logged[0] and "  test_accuracy " in logged[0]
    assert "val_" not in logged[0]
    assert bar[0].startswith("epoch 1/1 done  loss ")
    assert bar[1].startswith("epoch 1/1 test  loss ") and len(bar) == 2
    assert not logging.getLogger("slimtorch.train.trainer").filters
    # the history keeps its keys (written by slimtorch.train)
    history = json.loads((tmp_path / "t" / "history.json").read_text())
    assert history["val_accuracy"][-1] == pytest.approx(
        json.loads((tmp_path / "t" / "model" / "metrics.json").read_text())["test_accuracy"]
    )

    val = [
        "--verbose",
        *TRAIN,
        "--epochs",
        "1",
        "--val-fraction",
        "0.2",
        "--out",
        str(tmp_path / "v"),
    ]
    assert main(val) == 0
    logged, bar = epoch_lines()
    assert len(logged) == 1 and "  val_loss " in logged[0] and "test_" not in logged[0]
    assert bar[1].startswith("epoch 1/1 val  loss ")
    logging.getLogger("slimtorch").setLevel(logging.NOTSET)


def test_bn_recalibration_reaches_train_and_compress(
    model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import slimtorch.pipeline
    import slimtorch.train.classifier
    from slimtorch.train import BatchNormRecalibration

    seen: dict[str, object] = {}

    def fake_train(**kwargs: object) -> SimpleNamespace:
        seen["callbacks"] = kwargs["callbacks"](None)  # type: ignore[operator]
        metrics = {"accuracy": 0.5, "loss": 1.0}
        return SimpleNamespace(
            test_metrics=metrics, val_metrics=None, train_seconds=0.0, model_dir=tmp_path,
            replica_mismatches=None,
        )  # fmt: skip

    def fake_compress(**kwargs: object) -> SimpleNamespace:
        seen["compress"] = kwargs["bn_recalibration"]
        return SimpleNamespace(report={"layers": {"layers": []}}, table="table")

    monkeypatch.setattr(slimtorch.train.classifier, "train_classifier", fake_train)
    monkeypatch.setattr(slimtorch.pipeline, "compress_run", fake_compress)
    train = [*TRAIN, "--out", str(tmp_path / "t")]
    assert main(train) == 0
    assert seen["callbacks"] == []  # off by default for training from scratch
    assert main([*train, "--bn-recalibration", "5", "--overwrite"]) == 0
    (recal,) = seen["callbacks"]  # type: ignore[misc]
    assert isinstance(recal, BatchNormRecalibration) and recal.max_batches == 5
    compress = ["compress", "--in", str(model_dir), "--method", "svd", "--device", "cpu"]
    assert main([*compress, "--out", str(tmp_path / "c")]) == 0
    assert seen["compress"] == 100  # on by default after a fine-tune
    assert main([*compress, "--out", str(tmp_path / "c2"), "--bn-recalibration", "0"]) == 0
    assert seen["compress"] == 0
    capsys.readouterr()
    for command in (train, [*compress, "--out", str(tmp_path / "c3")]):
        assert main([*command, "--bn-recalibration", "-1"]) == 2
        assert "--bn-recalibration must be >= 0, got -1" in _error(capsys)
