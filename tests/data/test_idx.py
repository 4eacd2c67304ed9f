from __future__ import annotations

import gzip
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from slimtorch.core.errors import DataFormatError
from slimtorch.data import load_idx_pair, read_idx


def test_roundtrip_raw_and_gz(tmp_path: Path, write_idx: Callable[..., Path]) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for gz in (False, True):
        p = write_idx(tmp_path / f"a{gz}", arr, gz=gz)
        out = read_idx(p)
        assert out.shape == (2, 3, 4) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, arr)


def test_int32_payload_is_big_endian(tmp_path: Path, write_idx: Callable[..., Path]) -> None:
    arr = np.array([1, -2, 70000], dtype=np.int32)
    out = read_idx(write_idx(tmp_path / "i", arr))
    assert out.tolist() == [1, -2, 70000]


def test_truncated_payload_names_byte_counts(
    tmp_path: Path, write_idx: Callable[..., Path]
) -> None:
    p = write_idx(tmp_path / "t-idx3-ubyte", np.zeros((3, 2, 2), np.uint8))
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(DataFormatError, match=r"t-idx3-ubyte is truncated.*promises 12 .*holds 7"):
        read_idx(p)


def test_extra_bytes_are_an_error(tmp_path: Path, write_idx: Callable[..., Path]) -> None:
    p = write_idx(tmp_path / "x", np.zeros((2,), np.uint8))
    p.write_bytes(p.read_bytes() + b"\0")
    with pytest.raises(DataFormatError, match="longer than its header says"):
        read_idx(p)


def test_bad_magic_and_dtype(tmp_path: Path, write_idx: Callable[..., Path]) -> None:
    p = write_idx(tmp_path / "m", np.zeros((2,), np.uint8))
    raw = bytearray(p.read_bytes())
    raw[0] = 0x12
    p.write_bytes(bytes(raw))
    with pytest.raises(DataFormatError, match="expected 0000"):
        read_idx(p)
    raw[0], raw[2] = 0, 0x42
    p.write_bytes(bytes(raw))
    with pytest.raises(DataFormatError, match="dtype code 0x42"):
        read_idx(p)


def test_header_whose_size_overflows_int64(shared_data: Path, tmp_path: Path) -> None:
    labels = gzip.decompress((shared_data / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes())
    p = tmp_path / "t10k-labels-idx1-ubyte"
    p.write_bytes(bytes([0, 0, 0x08, 4]) + bytes([0, 1, 0, 0]) * 4 + labels[8:])  # 65536**4
    with pytest.raises(DataFormatError, match=r"promises 18446744073709551616 payload bytes"):
        read_idx(p)


def test_truncated_gzip(tmp_path: Path, write_idx: Callable[..., Path]) -> None:
    p = write_idx(tmp_path / "g.gz", np.arange(1000, dtype=np.uint8) % 7, gz=True)
    p.write_bytes(p.read_bytes()[:-20])
    with pytest.raises(DataFormatError, match=r"g\.gz is a damaged gzip file"):
        read_idx(p)


def test_load_pair_shapes_and_mismatch(tmp_path: Path, write_idx: Callable[..., Path]) -> None:
    imgs = write_idx(tmp_path / "i", np.full((3, 5, 6), 9, np.uint8))
    labs = write_idx(tmp_path / "l", np.array([0, 1, 2], np.uint8))
    x, y = load_idx_pair(imgs, labs)
    assert x.shape == (3, 1, 5, 6) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and y.tolist() == [0, 1, 2]
    short = write_idx(tmp_path / "s", np.array([0, 1], np.uint8))
    with pytest.raises(DataFormatError, match=r"holds 3 images but .* holds 2 labels"):
        load_idx_pair(imgs, short)


def test_real_mnist_test_file(shared_data: Path, tmp_path: Path) -> None:
    labels = read_idx(shared_data / "mnist" / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10000,)
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    # the same file uncompressed reads the same
    raw = tmp_path / "t10k-labels-idx1-ubyte"
    with (
        gzip.open(shared_data / "mnist" / "t10k-labels-idx1-ubyte.gz") as src,
        open(raw, "wb") as d,
    ):
        shutil.copyfileobj(src, d)
    np.testing.assert_array_equal(read_idx(raw), labels)
