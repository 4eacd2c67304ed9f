"""Exact values of the IDX, CIFAR npz, image-folder and download readers on tiny hand-made files."""

from __future__ import annotations

import hashlib
import io
import struct
import tarfile
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slimtorch.core.errors import ChecksumError, DataFormatError
from slimtorch.data import folder
from slimtorch.data.checksum import FileSpec
from slimtorch.data.cifar import read_cifar_npz
from slimtorch.data.download import download_file, extract_tar_members
from slimtorch.data.idx import load_idx_pair, read_idx


def _idx(path: Path, header: bytes, dims: tuple[int, ...], payload: bytes) -> Path:
    path.write_bytes(header + struct.pack(f">{len(dims)}I", *dims) + payload)
    return path


def test_int16_idx_values_are_read_big_endian(tmp_path: Path) -> None:
    p = _idx(tmp_path / "x", bytes([0, 0, 0x0B, 1]), (3,), struct.pack(">3h", 1, 256, -2))
    # little-endian would give [256, 1, -257]
    assert read_idx(p).tolist() == [1, 256, -2]


def test_float_labels_are_refused(tmp_path: Path) -> None:
    img = _idx(tmp_path / "img", bytes([0, 0, 8, 3]), (2, 2, 2), bytes(range(8)))
    lab = _idx(tmp_path / "lab", bytes([0, 0, 0x0D, 1]), (2,), struct.pack(">2f", 1.7, 2.2))
    with pytest.raises(DataFormatError, match="integer labels"):
        load_idx_pair(img, lab)


def test_idx_magic_must_start_with_two_zero_bytes(tmp_path: Path) -> None:
    p = _idx(tmp_path / "x", bytes([0, 5, 8, 1]), (2,), bytes([1, 2]))
    with pytest.raises(DataFormatError):
        read_idx(p)


def test_idx_with_zero_dimensions_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "x"
    p.write_bytes(bytes([0, 0, 8, 0, 7]))
    with pytest.raises(DataFormatError, match="declares 0 dimensions"):
        read_idx(p)


def test_int16_image_file_is_refused_as_images(tmp_path: Path) -> None:
    img = _idx(tmp_path / "img", bytes([0, 0, 0x0B, 3]), (2, 1, 1), struct.pack(">2h", 300, -5))
    lab = _idx(tmp_path / "lab", bytes([0, 0, 8, 1]), (2,), bytes([3, 4]))
    with pytest.raises(DataFormatError, match="expected uint8"):
        load_idx_pair(img, lab)


def test_cifar_test_npz_may_hold_exactly_10000_images(tmp_path: Path) -> None:
    p = tmp_path / "cifar10-test.npz"
    x = np.zeros((10000, 32, 32, 3), np.uint8)
    np.savez_compressed(p, x=x, y=np.zeros(10000, np.int64))
    images, labels = read_cifar_npz(p)
    assert tuple(images.shape) == (10000, 3, 32, 32)
    assert tuple(labels.shape) == (10000,)


def test_image_pixel_limit_is_inclusive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "x").mkdir()
    Image.new("L", (10, 10), 1).save(tmp_path / "x" / "0.png")
    monkeypatch.setattr(folder, "MAX_IMAGE_PIXELS", 100)
    assert tuple(folder.load_image_folder(tmp_path, channels=1).images.shape) == (1, 1, 10, 10)
    monkeypatch.setattr(folder, "MAX_IMAGE_PIXELS", 99)
    with pytest.raises(DataFormatError):
        folder.load_image_folder(tmp_path, channels=1)


def test_given_class_names_match_folders_whatever_their_unicode_form(tmp_path: Path) -> None:
    nfc = unicodedata.normalize("NFC", "café")
    nfd = unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    (tmp_path / nfc).mkdir()
    Image.new("L", (4, 4), 1).save(tmp_path / nfc / "0.png")
    data = folder.load_image_folder(tmp_path, channels=1, classes=[nfd, "tea"])
    assert data.labels.tolist() == [0]


def test_uppercase_sha256_is_accepted(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"abc")
    spec = FileSpec("f", sha256=hashlib.sha256(b"abc").hexdigest().upper())
    out = download_file([src.as_uri()], tmp_path / "out" / "f", spec)
    assert out.read_bytes() == b"abc"


def _tar(tmp_path: Path, symlink: bool = False) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("p/data")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"abcd"))
        if symlink:
            link = tarfile.TarInfo("p/link")
            link.type = tarfile.SYMTYPE
            link.linkname = "data"
            tar.addfile(link)
    archive = tmp_path / "a.tar"
    archive.write_bytes(buf.getvalue())
    return archive


def test_tar_member_of_the_wrong_size_fails_its_checksum(tmp_path: Path) -> None:
    archive = _tar(tmp_path)
    with pytest.raises(ChecksumError):
        extract_tar_members(archive, "p/", [FileSpec("data", size=3)], tmp_path / "out")


def test_symlink_tar_member_is_refused(tmp_path: Path) -> None:
    archive = _tar(tmp_path, symlink=True)
    with pytest.raises(DataFormatError):
        extract_tar_members(archive, "p/", [FileSpec("link")], tmp_path / "out")
