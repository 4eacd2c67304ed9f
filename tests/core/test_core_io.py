"""Atomic writes: content lands whole, a failing write leaves the old file, mode follows umask."""

from __future__ import annotations

import os
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
