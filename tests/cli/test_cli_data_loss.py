"""A mistyped --out, a second process or a re-save never destroys files the user keeps."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from slimtorch.cli.common import claim_run_folder
from slimtorch.cli.main import main
from slimtorch.models import create_model, save_model

COMPRESS = ["compress", "--method", "svd", "--finetune-epochs", "0", "--profiles", "none"]
COMPRESS += ["--device", "cpu", "--threads", "1", "--dataset", "digits"]


def _project(folder: Path) -> dict[str, bytes]:
    """A user's folder whose files carry the names a run writes."""
    folder.mkdir(parents=True)
    files = {
        "checkpoint.pt": b"my GAN checkpoint",
        "report.txt": b"MY THESIS REPORT",
        "history.json": b'{"mine": true}',
        "code.py": b"print('hi')",
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


@pytest.mark.parametrize("overwrite", [False, True])
def test_run_files_that_no_slimtorch_run_wrote_are_never_replaced(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], overwrite: bool
) -> None:
    out = tmp_path / "project"
    files = _project(out)
    flag = ["--overwrite"] if overwrite else []
    assert main([*COMPRESS, "--in", str(model_dir), "--out", str(out), *flag]) == 2
    err = capsys.readouterr().err
    assert "no slimtorch run wrote them there" in err and "checkpoint.pt" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files


def test_files_of_an_earlier_run_need_overwrite(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run that wrote no model (refused by --max-drop, or stopped) leaves its report: a new
    run into that --out replaced it without being asked."""
    out = tmp_path / "run"
    with claim_run_folder(str(out)):  # as an earlier command left it
        (out / "report.json").write_text('{"earlier": true}')
    args = [*COMPRESS, "--in", str(model_dir), "--out", str(out)]
    assert main(args) == 2
    assert "holds the files of an earlier run (report.json)" in capsys.readouterr().err
    assert (out / "report.json").read_text() == '{"earlier": true}'
    assert main([*args, "--overwrite"]) == 0


@pytest.mark.parametrize(
    ("command", "target"),
    [
        (["export", "--out"], "notes.txt"),
        (["export", "--out"], "checkpoint.pt"),
        (["profile", "--batch-size", "1", "--device", "cpu", "--json"], "results.pt2"),
    ],
)
def test_an_output_file_of_another_kind_is_not_overwritten(
    model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: list[str],
    target: str,
) -> None:
    path = tmp_path / target
    path.write_bytes(b"keep me")
    assert main([command[0], "--in", str(model_dir), *command[1:], str(path)]) == 2
    assert "exists and is not a" in capsys.readouterr().err
    assert path.read_bytes() == b"keep me"


def test_a_second_process_cannot_write_into_a_folder_being_written(tmp_path: Path) -> None:
    out = tmp_path / "run"
    holder = subprocess.Popen(  # holds --out the way a running command does
        [sys.executable, "-c",
         "import sys, time; from slimtorch.cli.common import claim_run_folder\n"
         "with claim_run_folder(sys.argv[1]):\n print('held', flush=True); time.sleep(30)",
         str(out)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=r"being written by another slimtorch process \(pid"):
            with claim_run_folder(str(out)):
                pass
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    with claim_run_folder(str(out)):  # released when its holder ended, however it ended
        pass


def _save(path: Path) -> Path:
    torch.manual_seed(0)
    return save_model(create_model("mlp", num_classes=10, in_channels=1, input_size=8), path,
                      input_shape=(1, 8, 8), mean=[0.0], std=[1.0],
                      class_names=[str(i) for i in range(10)])  # fmt: skip


def test_saving_over_a_model_keeps_what_the_user_put_beside_it(tmp_path: Path) -> None:
    path = _save(tmp_path / "model")
    (path / "NOTES.md").write_text("why this run matters")
    with pytest.raises(ValueError, match=r"holds NOTES\.md besides the model"):
        _save(path)
    assert (path / "NOTES.md").read_text() == "why this run matters"
    (path / "NOTES.md").unlink()
    backup = tmp_path / ".model.old"
    backup.mkdir()
    (backup / "best-run.txt").write_text("a hand-made backup")
    with pytest.raises(ValueError, match=r"\.model\.old exists and is not a slimtorch model"):
        _save(path)
    assert (backup / "best-run.txt").exists()
    shutil.rmtree(backup)
    _save(path)  # nothing of the user's in the way: replaced as before


def test_os_clutter_is_replaced_and_a_users_file_is_refused_before_the_work(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A .DS_Store in a model directory failed the save after the whole run; a user's own file
    must be named before any work, not after it."""
    out = tmp_path / "run"
    args = [*COMPRESS, "--in", str(model_dir), "--out", str(out)]
    assert main(args) == 0
    (out / "model" / ".DS_Store").write_bytes(b"finder")
    (out / "model" / ".ipynb_checkpoints").mkdir()
    assert main([*args, "--overwrite"]) == 0
    capsys.readouterr()
    (out / "model" / "NOTES.md").write_text("mine")
    assert main([*args, "--overwrite"]) == 2
    assert "holds NOTES.md besides the model" in capsys.readouterr().err
    assert not (out / "report.json").is_file() or (out / "model" / "NOTES.md").exists()


def test_a_run_folder_from_before_the_marker_is_still_recognised(
    model_dir: Path, tmp_path: Path
) -> None:
    """A refused compress of an earlier version left only its report (no model, no marker)."""
    out = tmp_path / "old"
    out.mkdir()
    (out / "report.json").write_text('{"method": "svd", "layers": [], "before": {}}')
    (out / "report.txt").write_text("table")
    assert main([*COMPRESS, "--in", str(model_dir), "--out", str(out), "--overwrite"]) == 0
