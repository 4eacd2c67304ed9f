from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from slimtorch.core.errors import ChecksumError, DataFormatError
from slimtorch.data import (
    FileSpec,
    extract_tar_members,
    read_cifar_batch,
    read_cifar_batches,
    read_cifar_npz,
)


def _batch(n: int, seed: int, *, bytes_keys: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    entry = {
        "batch_label": "testing batch 1 of 1",
        "labels": [int(v) for v in rng.integers(0, 10, n)],
        "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        "filenames": [f"img_{i}.png" for i in range(n)],
    }
    return {k.encode(): v for k, v in entry.items()} if bytes_keys else entry


def _write(path: Path, obj: object) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=4))
    return path


@pytest.mark.parametrize("bytes_keys", [False, True])
def test_reads_batch_layout(tmp_path: Path, bytes_keys: bool) -> None:
    entry = _batch(5, 0, bytes_keys=bytes_keys)
    x, y = read_cifar_batch(_write(tmp_path / "small_batch", entry))
    data = entry[b"data" if bytes_keys else "data"]
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.uint8
    assert y.tolist() == entry[b"labels" if bytes_keys else "labels"]
    # rows are 1024 red, 1024 green, 1024 blue values, each 32x32 row-major
    assert int(x[2, 1, 0, 0]) == int(data[2, 1024])
    assert int(x[4, 2, 31, 31]) == int(data[4, 3071])
    assert int(x[0, 0, 1, 3]) == int(data[0, 35])


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_arrays_of_every_pickle_protocol_numpy_writes(tmp_path: Path, protocol: int) -> None:
    entry = _batch(3, 1)
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps(entry, protocol=protocol))
    x, y = read_cifar_batch(path)
    assert x.reshape(3, -1).numpy().tolist() == entry["data"].tolist()
    assert y.tolist() == entry["labels"]


def test_codecs_encode_only_for_latin1(tmp_path: Path) -> None:
    path = tmp_path / "batch"
    path.write_bytes(b"c_codecs\nencode\n(Vabc\nVrot13\ntR.")  # _codecs.encode("abc", "rot13")
    with pytest.raises(DataFormatError, match="latin-1 only"):
        read_cifar_batch(path)


def test_md5_checked_before_parsing(tmp_path: Path) -> None:
    p = _write(tmp_path / "b", _batch(2, 1))
    good = hashlib.md5(p.read_bytes()).hexdigest()
    assert read_cifar_batch(p, md5=good)[0].shape[0] == 2
    with pytest.raises(ChecksumError, match=r"expected 0{32}"):
        read_cifar_batch(p, md5="0" * 32)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    p = tmp_path / "data_batch_evil"
    p.write_bytes(pickle.dumps({"data": _Exploit(marker)}, protocol=2))
    with pytest.raises(DataFormatError, match=r"refusing to load the global (posix|nt|os)\.system"):
        read_cifar_batch(p)
    assert not marker.exists()


def test_other_globals_refused(tmp_path: Path) -> None:
    p = tmp_path / "b"
    p.write_bytes(pickle.dumps({"data": io.BytesIO}, protocol=4))
    with pytest.raises(DataFormatError, match=r"_io\.BytesIO"):
        read_cifar_batch(p)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda e: e.pop("data"), "'data' must be a uint8 array"),
        (lambda e: e.update(data=e["data"][:, :100]), "has 100 columns, expected 3072"),
        (lambda e: e.update(labels=e["labels"][:-1]), "one label per image"),
        (lambda e: e.update(labels=[10] * len(e["labels"])), r"labels must lie in \[0, 9\]"),
        (lambda e: e.update(labels=[0.5, 1.7, 9.9]), r"'labels' must be integers, got float64"),
        (lambda e: e.update(labels=[True, False, True]), r"'labels' must be integers, got bool"),
    ],
)
def test_content_is_validated(tmp_path: Path, mutate, match: str) -> None:
    entry = _batch(3, 2)
    mutate(entry)
    with pytest.raises(DataFormatError, match=match):
        read_cifar_batch(_write(tmp_path / "b", entry))


def test_not_a_pickle(tmp_path: Path) -> None:
    p = tmp_path / "junk"
    p.write_bytes(b"\x80\x04junk")
    with pytest.raises(DataFormatError, match="not a readable CIFAR batch"):
        read_cifar_batch(p)


def test_batches_concatenate_and_known_names_are_verified(tmp_path: Path) -> None:
    a = _write(tmp_path / "part_a", _batch(2, 3))
    b = _write(tmp_path / "part_b", _batch(3, 4))
    x, y = read_cifar_batches([a, b])
    assert x.shape[0] == 5 and y.shape == (5,)
    fake = _write(tmp_path / "data_batch_1", _batch(2, 5))  # official name, other bytes
    with pytest.raises(ChecksumError, match="c99cafc152244af753f735de768cd75f"):
        read_cifar_batches([fake])
    assert read_cifar_batches([fake], verify=False)[0].shape[0] == 2


def test_npz(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    y = np.array([0, 9, 3, 3])
    np.savez(tmp_path / "c.npz", x=x, y=y)
    images, labels = read_cifar_npz(tmp_path / "c.npz")
    assert images.shape == (4, 3, 32, 32)
    assert int(images[1, 2, 5, 7]) == int(x[1, 5, 7, 2])
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 9, 3, 3]
    np.savez(tmp_path / "col.npz", x=x, y=y[:, None])
    assert read_cifar_npz(tmp_path / "col.npz")[1].tolist() == [0, 9, 3, 3]


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"x": np.zeros((2, 32, 32, 3), np.uint8)}, "lacks the array.*y"),
        ({"x": np.zeros((2, 3, 32, 32), np.uint8), "y": np.zeros(2, int)}, r"\(N, 32, 32, 3\)"),
        ({"x": np.zeros((2, 32, 32, 3), np.float32), "y": np.zeros(2, int)}, "must be uint8"),
        ({"x": np.zeros((2, 32, 32, 3), np.uint8), "y": np.zeros(3, int)}, "must hold 2 integer"),
        ({"x": np.zeros((1, 32, 32, 3), np.uint8), "y": np.array([11])}, r"lie in \[0, 9\]"),
    ],
)
def test_npz_validation(tmp_path: Path, arrays: dict, match: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataFormatError, match=match):
        read_cifar_npz(tmp_path / "bad.npz")


def test_truncated_or_mislabelled_npz_is_named(tmp_path: Path) -> None:
    np.savez(tmp_path / "c.npz", x=np.zeros((2, 32, 32, 3), np.uint8), y=np.zeros(2, int))
    data = (tmp_path / "c.npz").read_bytes()
    (tmp_path / "c.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFormatError, match=r"c\.npz is not a readable \.npz"):
        read_cifar_npz(tmp_path / "c.npz")
    np.save(tmp_path / "a.npy", np.zeros(3))
    (tmp_path / "a.npy").rename(tmp_path / "a.npz")  # an array file under the archive name
    with pytest.raises(DataFormatError, match=r"a\.npz is not a readable \.npz"):
        read_cifar_npz(tmp_path / "a.npz")


def test_npz_with_objects_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object), y=np.zeros(1, int))
    with pytest.raises(DataFormatError, match="without pickled objects"):
        read_cifar_npz(tmp_path / "obj.npz")


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("damage", ["truncated", "not a tar"])
def test_a_damaged_archive_is_named(tmp_path: Path, damage: str) -> None:
    archive = _tar(tmp_path / "a.tar.gz", {"p/test_batch": bytes(range(256)) * 400})
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"hello")
    with pytest.raises(DataFormatError, match=r"a\.tar\.gz is not a readable tar archive"):
        extract_tar_members(archive, "p/", [FileSpec("test_batch")], tmp_path / "out")
    assert not (tmp_path / "out" / "test_batch").exists()


def test_extract_tar_members(tmp_path: Path) -> None:
    payload = pickle.dumps(_batch(2, 6), protocol=4)
    arch = _tar(tmp_path / "a.tar.gz", {"cifar-10-batches-py/test_batch": payload})
    spec = FileSpec("test_batch", md5=hashlib.md5(payload).hexdigest())
    out = extract_tar_members(arch, "cifar-10-batches-py/", [spec], tmp_path / "out")
    assert out == [tmp_path / "out" / "test_batch"] and out[0].read_bytes() == payload

    bad = FileSpec("test_batch", md5="1" * 32)
    with pytest.raises(ChecksumError, match=r"expected 1{32}"):
        extract_tar_members(arch, "cifar-10-batches-py/", [bad], tmp_path / "out2")
    assert list((tmp_path / "out2").iterdir()) == []
    with pytest.raises(DataFormatError, match="has no member cifar-10-batches-py/data_batch_1"):
        extract_tar_members(arch, "cifar-10-batches-py/", [FileSpec("data_batch_1")], tmp_path)
