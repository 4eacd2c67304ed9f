"""Atomic writes: content lands whole, a failing write leaves the old file, mode follows umask."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from slimtorch.core.io import atomic_write, atomic_write_json, atomic_write_text, read_json


def test_atomic_write_replaces_and_uses_umask(tmp_path: Path) -> None:
    p = tmp_path / "a" / "f.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask
    assert [x.name for x in p.parent.iterdir()] == ["f.txt"]  # no temp files left


def test_failed_write_keeps_old_file(tmp_path: Path) -> None:
    p = tmp_path / "f.json"
    atomic_write_json(p, {"a": 1})

    def boom(tmp: str) -> None:
        Path(tmp).write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(p, boom)
    assert read_json(p) == {"a": 1}
    assert [x.name for x in tmp_path.iterdir()] == ["f.json"]


def test_read_json_names_bad_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json is not valid JSON"):
        read_json(p)


def test_the_rename_is_flushed_to_disk_with_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[bool] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write_text(tmp_path / "a.txt", "x")
    assert synced == [False, True]  # the file's data, then the folder holding the new name


def test_a_folder_that_cannot_be_opened_for_the_flush_does_not_fail_the_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.open

    def no_read(path: object, flags: int, *args: object) -> int:
        if os.path.isdir(str(path)):  # a folder with write and search permission only
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", no_read)
    atomic_write_text(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").read_text() == "x"


_WRITES = r"""
import resource, sys, torch
from torch import nn
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # writes past 4 KiB fail (EFBIG)
out = sys.argv[1]
model = nn.Linear(64, 64)
what = sys.argv[2]
try:
    if what == "checkpoint":
        from slimtorch.train.checkpoint import save_checkpoint
        save_checkpoint(out + "/checkpoint.pt", {"model": model.state_dict()})
    elif what == "model":
        from slimtorch.models import create_model, save_model
        net = create_model("mlp", in_channels=1, input_size=8)
        save_model(net, out + "/m", input_shape=(1, 8, 8), mean=[0.5], std=[0.5],
                   class_names=[str(i) for i in range(10)])
    else:
        from slimtorch.models import save_exported
        save_exported(model, torch.randn(2, 64), out + "/m.pt2")
except OSError as exc:
    print("OSError", exc.errno, exc)
"""


@pytest.mark.skipif(os.name != "posix", reason="RLIMIT_FSIZE is POSIX")
@pytest.mark.parametrize("what", ["checkpoint", "model", "exported"])
def test_a_write_that_runs_out_of_room_is_an_oserror_naming_the_file(
    tmp_path: Path, what: str
) -> None:
    # torch's writer said only "unexpected pos 704 vs 598", safetensors raised its own error
    # type, and torch.export.save aborted the whole process
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-c", _WRITES, str(tmp_path), what],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    first = run.stdout.strip().splitlines()[-1]
    assert re.match(rf"OSError (\d+) \[Errno \1\] could not write {tmp_path}/\S+ \(", first), first
    assert "free disk space" in first
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]  # nothing left


def test_write_errors_of_other_kinds_pass_through(tmp_path: Path) -> None:
    def bad(tmp: str) -> None:
        raise RuntimeError("cannot pickle 'generator' object")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_write(tmp_path / "x.pt", bad)


def test_a_killed_writers_temporary_files_are_removed_by_the_next_write(tmp_path: Path) -> None:
    # a SIGKILL mid-write (the OOM killer) left full-size temporary copies that no later run
    # removed; a live writer's temporary file must stay
    import subprocess
    import sys

    from slimtorch.core.io import temp_name

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    pid = int(dead.stdout)
    target = tmp_path / "checkpoint.pt"
    stale = tmp_path / f".checkpoint.pt.{pid}.0a1b2c.tmp"
    stale.write_bytes(b"x" * 1000)
    live = tmp_path / temp_name(target)  # this process's own, as if mid-write
    live.write_bytes(b"y")
    other = tmp_path / f".history.json.{pid}.0a1b2c.tmp"  # another file's: not this write's
    other.write_bytes(b"z")
    atomic_write_text(target, "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["checkpoint.pt", live.name, other.name]
    )
    # a model directory's save sweeps the folders a killed save left
    from slimtorch.models import create_model, save_model

    stale_dir = tmp_path / f".m.{pid}.0a1b2c.tmp"
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"w" * 1000)
    net = create_model("mlp", in_channels=1, input_size=8)
    names = list("0123456789")
    save_model(net, tmp_path / "m", input_shape=(1, 8, 8), mean=[0.5], std=[0.5], class_names=names)
    assert not stale_dir.exists()


def test_a_write_refused_for_another_reason_is_named_without_the_disk_advice(
    tmp_path: Path,
) -> None:
    import errno

    def denied(tmp: str) -> None:
        raise OSError(errno.EACCES, "Permission denied")

    with pytest.raises(OSError) as info:
        atomic_write(tmp_path / "x.json", denied)
    path = tmp_path / "x.json"
    assert str(info.value) == f"[Errno 13] could not write {path} (Permission denied)"


def test_stale_temp_sweep_never_signals_on_windows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # os.kill(pid, 0) on Windows sends CTRL_C_EVENT to the pid's process group
    from slimtorch.core import io

    def kill(pid: int, sig: int) -> None:
        raise AssertionError("os.kill called")

    monkeypatch.setattr(io, "_WINDOWS", True)
    monkeypatch.setattr(io.os, "kill", kill)
    stale = tmp_path / ".checkpoint.pt.999999999.0a1b2c.tmp"
    stale.write_bytes(b"x")
    assert io.remove_stale_temps(tmp_path / "checkpoint.pt") == []
    assert stale.exists()


def test_another_machines_temporary_files_are_left_alone(tmp_path: Path) -> None:
    # a pid means a process only on the machine (and pid namespace) that took it: a live
    # writer on another NFS client or in a container looked dead here, and the sweep deleted
    # its file mid-write (a save_model there then installed a folder without its weights)
    import subprocess
    import sys

    from slimtorch.core import io

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    pid = int(dead.stdout)
    ours = tmp_path / f".m.json.{pid}-{io._HOST}.0a1b2c.tmp"
    theirs = tmp_path / f".m.json.{pid}-{'0' * 8 if io._HOST != '0' * 8 else '1' * 8}.0a1b2c.tmp"
    ours.write_text("killed here")
    theirs.write_text("still being written elsewhere")
    assert io.remove_stale_temps(tmp_path / "m.json") == [ours.name]
    assert theirs.exists()
    assert io.temp_name(tmp_path / "m.json").startswith(f".m.json.{os.getpid()}-{io._HOST}.")
