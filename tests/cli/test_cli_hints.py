"""CLI: the hint an error or warning gives works when followed as written."""

from __future__ import annotations

import json
import logging
import signal
import zipfile
from pathlib import Path

import pytest
import torch

from slimtorch.cli.main import main

TRAIN = ["train", "--model", "mlp", "--dataset", "digits", "--batch-size", "64"]
TRAIN += ["--device", "cpu", "--threads", "1", "--no-progress"]


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line a failed command printed on stderr."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _save_digits_model(path: Path, model: torch.nn.Module) -> Path:
    from slimtorch.data import load_dataset
    from slimtorch.models import save_model

    ds = load_dataset("digits", "test")
    return save_model(model, path, input_shape=(1, 8, 8), mean=ds.mean, std=ds.std,
                      class_names=list(ds.classes), extra={"dataset": "digits"})  # fmt: skip


def test_a_hand_mixed_model_is_told_to_call_float_and_save_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the hint named compress --method fp16, which failed on it with a RuntimeError traceback
    from slimtorch.models import create_model, load_model, save_model

    mixed = create_model("lenet5", num_classes=10, in_channels=1, input_size=8).half()
    next(m for m in mixed.modules() if isinstance(m, torch.nn.Conv2d)).float()  # by hand
    path = _save_digits_model(tmp_path / "mixed", mixed)
    assert main(["profile", "--in", str(path), "--device", "cpu", "--profiles", "none"]) == 2
    err = _error(capsys)
    assert "load it, call model.float() and save it again" in err
    assert "cast it with slimtorch compress" not in err
    out = ["--out", str(tmp_path / "fp16"), "--device", "cpu", "--threads", "1"]
    assert main(["compress", "--in", str(path), "--method", "fp16", *out]) == 2
    err = _error(capsys)
    assert err.startswith("slimtorch compress: error: the model's weights mix float16, float32")
    assert err.endswith("load it, call model.float() and save it again")
    model, card = load_model(path)  # as the hint says
    save_model(model.float(), path, input_shape=card.input_shape, mean=card.mean, std=card.std,
               class_names=card.class_names, extra=card.extra)  # fmt: skip
    assert main(["profile", "--in", str(path), "--device", "cpu", "--profiles", "none"]) == 0


def test_a_nan_input_names_the_per_input_allow_nan_key(tmp_path: Path) -> None:
    # "set allow_nan in the model config": a top-level allow_nan made the model unavailable
    from serve_helpers import KEY, app_client, make_mlp, save_slimtorch

    save_slimtorch(tmp_path / "plain" / "1", make_mlp(3))
    body = b'{"inputs":[{"name":"input","shape":[1,1,8,8],"datatype":"FP32","data":[NaN'
    body += b",0" * 63 + b"]}]}"
    with app_client(tmp_path, api_key=KEY) as c:
        r = c.post("/v2/models/plain/infer", content=body)
    assert r.status_code == 400
    assert r.json()["error"].endswith(
        "send finite numbers (or set \"allow_nan\": true on input 'input' in the inputs list of "
        "the model's config.json)"
    )
    spec = {"name": "input", "datatype": "FP32", "dims": [1, 8, 8], "allow_nan": True}
    (tmp_path / "plain" / "config.json").write_text(json.dumps({"inputs": [spec]}))
    with app_client(tmp_path, api_key=KEY) as c:
        r = c.post("/v2/models/plain/infer", content=body)
    assert r.status_code == 200, r.text


def test_export_without_local_data_says_it_reads_local_files_only(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    # the warning said "leave out --no-download": export has no such option and never downloads
    from slimtorch.cli.export_cmd import calibration_batches
    from slimtorch.models import ModelCard

    monkeypatch.delenv("SLIMTORCH_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    card = ModelCard(architecture={"name": "mlp", "kwargs": {}}, transforms=[],
                     input_shape=(1, 28, 28), mean=(0.5,), std=(0.25,), class_names=(),
                     dtype="float32", torch_version="", extra={"dataset": "mnist"})  # fmt: skip
    with caplog.at_level("WARNING", logger="slimtorch.cli.export_cmd"):
        assert calibration_batches(card, 1, None) is None
    assert "no readable local mnist training data" in caplog.text
    assert "export reads local files only: pass --data-root DIR or set SLIMTORCH_DATA" in (
        caplog.text
    )
    assert "download" not in caplog.text.lower()
    batches = calibration_batches(card, 1, str(shared_data))  # --data-root DIR
    assert batches is not None and len(batches) == 1


def test_resume_without_a_checkpoint_says_to_rerun_without_resume(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # "pass --overwrite" with --resume still given is refused
    import shutil

    out = tmp_path / "model-only"
    shutil.copytree(model_dir, out / "model")
    run = [*TRAIN, "--epochs", "1", "--out", str(out)]
    assert main([*run, "--resume"]) == 2
    assert _error(capsys).endswith(
        "rerun without --resume, with --overwrite, to train a new model there, or choose "
        "another --out"
    )
    assert main([*run, "--resume", "--overwrite"]) == 2
    capsys.readouterr()
    assert main([*run, "--overwrite"]) == 0


def test_out_of_memory_names_only_the_options_the_command_has(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    # export has no --device; its batch is --batch
    import slimtorch.models

    def no_memory(*args: object, **kwargs: object) -> None:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: 5 GB")

    monkeypatch.setattr(slimtorch.models, "load_model", no_memory)
    assert main(["export", "--in", str(model_dir), "--out", str(tmp_path / "m.onnx")]) == 2
    assert _error(capsys).endswith("use a smaller --batch, input shape or model")
    assert main(["profile", "--in", str(model_dir), "--device", "cpu"]) == 2
    assert _error(capsys).endswith("use a smaller batch, input shape or model, or another --device")


def test_an_unreadable_program_is_not_told_to_pass_input_shape(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # --input-shape fails the same way on a file that is no zip
    base = ["profile", "--device", "cpu", "--profiles", "none"]
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"junk")
    assert main([*base, "--exported", str(junk)]) == 2
    assert "--input-shape" not in _error(capsys)
    assert main([*base, "--exported", str(junk), "--input-shape", "1,8,8"]) == 2
    assert "is not a torch.export archive" in _error(capsys)
    other = tmp_path / "other.pt2"  # a zip laid out otherwise: --input-shape may load it
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("other/data/0", b"0")
    assert main([*base, "--exported", str(other)]) == 2
    assert _error(capsys).endswith("; or pass --input-shape C,H,W")


def test_other_suffixes_are_read_as_the_warning_says(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # "pass extensions=": no option takes it, nor does load_dataset
    from PIL import Image

    from slimtorch.data.folder import load_image_folder

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / cls / "0.png")
        Image.new("RGB", (8, 8), (0, 255, 0)).save(tmp_path / cls / "1.gif")
    with caplog.at_level("WARNING", logger="slimtorch.data.folder"):
        assert len(load_image_folder(tmp_path)) == 2
    assert caplog.text.rstrip().endswith(
        "call slimtorch.data.folder.load_image_folder(path, extensions=...) to read other "
        "suffixes, or convert them to .png/.jpg/.jpeg/.bmp"
    )
    assert len(load_image_folder(tmp_path, extensions=(".png", ".gif"))) == 4


def test_a_missing_repository_names_the_environment_variable_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SLIMTORCH_SERVE_REPOSITORY", str(tmp_path / "nope"))
    assert main(["serve"]) == 2
    err = _error(capsys)
    assert f"model repository {tmp_path / 'nope'} (from --repository or " in err
    assert "SLIMTORCH_SERVE_REPOSITORY) is not a folder" in err
    assert err.endswith("(or unset both to serve the model directories under --runs-dir)")


def test_unrecognized_arguments_point_to_the_sub_commands_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # "(see slimtorch --help)" does not list a sub-command's options
    with pytest.raises(SystemExit) as info:
        main(["compress", "--in", "x", "--out", "y", "--method", "ptq", "--epochs", "0"])
    assert info.value.code == 2
    assert _error(capsys) == (
        "slimtorch compress: error: unrecognized arguments: --epochs 0 "
        "(see slimtorch compress --help)"
    )
    with pytest.raises(SystemExit) as info:
        main(["compress", "--help"])
    assert info.value.code == 0 and "--finetune-epochs" in capsys.readouterr().out


def test_an_unknown_option_before_the_command_is_the_top_level_parsers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # "slimtorch devices: error: ... --bogus" blamed a command the option was never given to
    with pytest.raises(SystemExit) as info:
        main(["--bogus", "devices"])
    assert info.value.code == 2
    assert _error(capsys) == (
        "slimtorch: error: unrecognized arguments: --bogus (see slimtorch --help)"
    )
    with pytest.raises(SystemExit):
        main(["--verbose", "devices", "--bogus"])
    assert _error(capsys).startswith("slimtorch devices: error: unrecognized arguments: --bogus")


def test_a_bfloat16_model_is_told_to_export_to_a_pt2_file() -> None:
    # "--format pt2" with --out x.onnx is refused: the suffix names the format
    from slimtorch.quant.precision import check_export_dtypes

    model = torch.nn.Sequential(torch.nn.Linear(2, 2)).to(torch.bfloat16)
    with pytest.raises(ValueError) as info:
        check_export_dtypes(model, torch.randn(1, 2))
    assert "export it to a .pt2 file (--out FILE.pt2, torch.export)" in str(info.value)
    assert "--format pt2" not in str(info.value)


def test_a_onecycle_resume_names_the_option_and_the_schedules_that_extend(
    tmp_path: Path,
) -> None:
    from slimtorch.core.errors import CheckpointError
    from slimtorch.train import TrainConfig, Trainer
    from slimtorch.train.config import SCHEDULES
    from train_helpers import ListLoader, make_blobs, make_mlp

    x, y = make_blobs(32, seed=1)

    def fit(epochs: int, resume: bool) -> None:
        cfg = TrainConfig(epochs=epochs, schedule="onecycle", amp="off", progress=False)
        Trainer(make_mlp(), cfg, out_dir=tmp_path).fit(ListLoader(x, y, 8), resume=resume)

    fit(1, False)
    with pytest.raises(CheckpointError) as info:
        fit(2, True)
    message = str(info.value)
    assert "resume with epochs=1 (--epochs 1), or start a new run" in message
    assert "(a cosine or constant schedule can be extended)" in message
    assert {"cosine", "constant"} <= set(SCHEDULES) and "step" not in SCHEDULES
    with pytest.raises(CheckpointError, match=r"or use a new out_dir \(--out\)"):
        Trainer(make_mlp(), TrainConfig(epochs=1, schedule="onecycle", amp="off",
                                        progress=False), out_dir=tmp_path
                ).fit(ListLoader(x, y, 4), resume=True)  # fmt: skip


@pytest.mark.usefixtures("python_sigint")
def test_the_first_stop_signal_does_not_promise_a_resumable_checkpoint(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # compress cannot resume its fine-tune; a run without out_dir writes no checkpoint
    from slimtorch.train.interrupt import stop_requests

    with caplog.at_level(logging.WARNING, logger="slimtorch.train.interrupt"):
        with stop_requests(enabled=True) as request:
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)  # type: ignore[operator]
    assert request.signum == signal.SIGINT
    assert "to resume from" not in caplog.text
    assert "SIGINT: stopping after this step and writing a checkpoint if the run keeps one" in (
        caplog.text
    )
