from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import pickle
import shutil
import socket
import tarfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from slimtorch.core.errors import ChecksumError, DataNotFoundError
from slimtorch.data import DATASETS, FileSpec, dataset_info, download_file, load_dataset
from slimtorch.data.catalog import Layout

LABELS = "t10k-labels-idx1-ubyte.gz"
IMAGES = "t10k-images-idx3-ubyte.gz"


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A static file server on 127.0.0.1 (random port), stopped after the test."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@contextmanager
def _raw_http(reply: bytes) -> Iterator[str]:
    """A server on 127.0.0.1 that answers every request with ``reply`` verbatim and closes."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.05)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(65536)
                conn.sendall(reply)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/"
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


def test_download_file_via_file_url(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "mnist" / LABELS
    spec = dataset_info("mnist").layouts["test"][0].files[1]
    dest = download_file([src.as_uri()], tmp_path / "out" / LABELS, spec)
    assert dest.read_bytes() == src.read_bytes()


def test_download_file_falls_back_to_next_mirror(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "mnist" / LABELS
    spec = FileSpec(LABELS, md5=hashlib.md5(src.read_bytes()).hexdigest())
    missing = (tmp_path / "nowhere" / LABELS).as_uri()
    dest = download_file([missing, src.as_uri()], tmp_path / "o" / LABELS, spec)
    assert dest.stat().st_size == src.stat().st_size


def test_download_file_unreachable(tmp_path: Path) -> None:
    url = (tmp_path / "nowhere" / "f").as_uri()
    with pytest.raises(DataNotFoundError, match=r"could not download f; tried:\n  file:"):
        download_file([url], tmp_path / "o" / "f")
    assert _leftovers(tmp_path / "o") == []
    with pytest.raises(ValueError, match="unsupported URL scheme 'ftp'"):
        download_file(["ftp://example.org/f"], tmp_path / "o" / "f")


def test_transfer_cut_short_leaves_no_file(shared_data: Path, tmp_path: Path) -> None:
    data = (shared_data / "mnist" / LABELS).read_bytes()
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    with _raw_http(head.encode() + data[: len(data) // 2]) as url:
        with pytest.raises(
            DataNotFoundError,
            match=rf"transfer was cut short: .* announced {len(data)} bytes of {LABELS} and "
            rf"sent {len(data) // 2}",
        ):
            download_file([url + LABELS], tmp_path / "o" / LABELS)  # no published digest
    assert _leftovers(tmp_path / "o") == []


def test_malformed_http_reply_moves_on_to_the_next_mirror(
    shared_data: Path, tmp_path: Path
) -> None:
    src = shared_data / "mnist" / LABELS
    spec = dataset_info("mnist").layouts["test"][0].files[1]
    with _raw_http(b"not an HTTP status line\r\n\r\n") as url:
        dest = download_file([url + LABELS, src.as_uri()], tmp_path / "o" / LABELS, spec)
    assert dest.read_bytes() == src.read_bytes()


def test_a_single_url_string_is_refused(isolated: Path, tmp_path: Path) -> None:
    url = (tmp_path / "mirror" / LABELS).as_uri()
    with pytest.raises(TypeError, match=r"urls must be a list of URLs, got the string 'file:"):
        download_file(url, tmp_path / "o" / LABELS)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"mirrors must be a list of base URLs, got the string"):
        load_dataset("mnist", "test", mirrors=(tmp_path / "mirror").as_uri())
    assert _leftovers(tmp_path / "o") == [] and _leftovers(isolated) == []


def test_load_dataset_downloads_over_http(
    shared_data: Path, isolated: Path, serve: tuple[str, Path], tmp_path: Path
) -> None:
    url, www = serve
    for f in (LABELS, IMAGES):
        shutil.copy(shared_data / "mnist" / f, www / f)
    ds = load_dataset("mnist", "test", root=tmp_path / "empty", mirrors=[url])
    assert ds.images.shape == (10000, 1, 28, 28)
    assert _leftovers(isolated) == ["mnist", IMAGES, LABELS]
    assert (isolated / "mnist" / LABELS).read_bytes() == (
        shared_data / "mnist" / LABELS
    ).read_bytes()
    # now cached: no server needed
    assert len(load_dataset("mnist", "test", download=False)) == 10000


def test_corrupt_download_leaves_no_file(
    shared_data: Path, isolated: Path, serve: tuple[str, Path]
) -> None:
    url, www = serve
    shutil.copy(shared_data / "mnist" / IMAGES, www / IMAGES)
    raw = bytearray((shared_data / "mnist" / LABELS).read_bytes())
    raw[100] ^= 0xFF
    (www / LABELS).write_bytes(bytes(raw))
    with pytest.raises(
        ChecksumError,
        match=r"(?s)no mirror served a valid t10k-labels.*has sha256 .* expected f7ae",
    ):
        load_dataset("mnist", "test", mirrors=[url])
    assert LABELS not in _leftovers(isolated)
    assert not [n for n in _leftovers(isolated) if n.endswith(".tmp")]


def test_download_failure_names_folders_and_urls(isolated: Path, serve: tuple[str, Path]) -> None:
    url, _ = serve  # serves an empty folder: every file is a 404
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("fashion-mnist", "test", mirrors=[url])
    msg = str(info.value)
    assert "The download failed" in msg and "404" in msg
    assert str(isolated / "fashion-mnist") in msg and "t10k-images-idx3-ubyte.gz" in msg
    assert _leftovers(isolated / "fashion-mnist") == []


def test_cifar_archive_download(
    isolated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stand-in for cifar-10-python.tar.gz with the official structure and our own md5s.
    rng = np.random.default_rng(0)
    blobs = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"labels": [int(v) for v in rng.integers(0, 10, 4)],
                 "data": rng.integers(0, 256, (4, 3072), dtype=np.uint8)}  # fmt: skip
        blobs[name] = pickle.dumps(entry, protocol=4)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    with tarfile.open(mirror / "cifar-10-python.tar.gz", "w:gz") as tar:
        for name, data in blobs.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    real = dataset_info("cifar10")

    def relabel(layout: Layout) -> Layout:
        files = tuple(
            dataclasses.replace(f, md5=hashlib.md5(blobs[f.name]).hexdigest()) for f in layout.files
        )
        return dataclasses.replace(layout, files=files)

    archive_md5 = hashlib.md5((mirror / "cifar-10-python.tar.gz").read_bytes()).hexdigest()
    fake = dataclasses.replace(
        real,
        layouts={s: (relabel(real.layouts[s][0]),) for s in real.layouts},
        archive=FileSpec("cifar-10-python.tar.gz", md5=archive_md5),
    )
    monkeypatch.setitem(DATASETS._items, "cifar10", fake)
    # what a fetch killed by SIGTERM left: its folder with a partial archive (dead process)
    killed = isolated / "cifar10" / ".cifar-10-python.tar.gz.999999999.0123abcd.tmp"
    killed.mkdir(parents=True)
    (killed / "cifar-10-python.tar.gz").write_bytes(b"partial")
    ds = load_dataset("cifar10", "train", mirrors=[mirror.as_uri() + "/"])
    assert ds.images.shape == (20, 3, 32, 32)
    target = isolated / "cifar10" / "cifar-10-batches-py"
    assert sorted(p.name for p in target.iterdir()) == sorted(blobs)
    assert [p.name for p in (isolated / "cifar10").iterdir()] == ["cifar-10-batches-py"]
    assert len(load_dataset("cifar10", "test", download=False)) == 4
