"""Decompression bombs in dataset files: small crafted files that declare (or inflate to) far
more data than they hold are refused from their headers, before the data is decoded."""

from __future__ import annotations

import io
import struct
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, ImageOps

from slimtorch.core.errors import DataFormatError
from slimtorch.data import load_idx_pair, load_image_folder, read_cifar_npz, read_idx
from slimtorch.data.folder import _channel_stats

MIB = 1 << 20


def _proc_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


@contextmanager
def peak_growth_mib() -> Iterator[dict[str, float]]:
    """How far the process's peak RSS rose above its RSS on entry, in MiB (Linux: the peak is
    reset through /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _proc_kib("VmRSS")
    except (OSError, KeyError):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    out: dict[str, float] = {}
    yield out
    out["mib"] = (_proc_kib("VmHWM") - before) / 1024


# --- image folders -----------------------------------------------------------------------------


def _png_declaring(path: Path, width: int, height: int) -> Path:
    """A ~70-byte PNG whose IHDR declares ``width`` x ``height`` pixels (its data is 1x1)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any pixel decoding fails the test: a bomb must be refused from its header."""

    def load(self: object) -> None:
        raise AssertionError(f"pixels of {self!r} were decoded: the header check did not refuse")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


@pytest.mark.parametrize(
    ("width", "height", "channels"),
    [
        (10000, 10000, 3),  # the review's probe: 100 M pixels, only a warning to Pillow
        (10000, 9000, 3),  # 90 M: above Pillow's limit (89.5 M), below its error level
        (10000, 10000, None),  # channels read from the headers first
    ],
)
def test_image_folder_refuses_a_png_bomb_from_its_header(
    tmp_path: Path, no_decoding: None, width: int, height: int, channels: int | None
) -> None:
    bomb = _png_declaring(tmp_path / "pets" / "cat" / "bomb.png", width, height)
    assert bomb.stat().st_size < 200
    Image.new("L", (8, 8)).save(tmp_path / "pets" / "dog.png")  # loose: not read
    _png_declaring(tmp_path / "pets" / "dog" / "ok.png", 1, 1)
    with pytest.raises(
        DataFormatError,
        match=rf"image .*cat/bomb\.png declares {width}x{height} pixels \({width * height}\), "
        r"more than the limit of 89478485 .*refused before decoding",
    ):
        load_image_folder(tmp_path / "pets", channels=channels, size=32)


def test_a_24_megapixel_photo_still_loads(tmp_path: Path) -> None:
    (tmp_path / "f" / "a").mkdir(parents=True)
    Image.new("1", (6000, 4000), 1).save(tmp_path / "f" / "a" / "0.png")  # 24 M white pixels
    ds = load_image_folder(tmp_path / "f", channels=1, size=16)
    assert ds.images.shape == (1, 1, 16, 16) and int(ds.images.min()) == 255


def test_a_bomb_warning_while_decoding_is_an_error_only_inside_the_loader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _png_declaring(tmp_path / "f" / "a" / "0.png", 1, 1)

    def transpose(img: Image.Image) -> Image.Image:  # as Pillow warns when a frame grows
        warnings.warn("Image size exceeds limit", Image.DecompressionBombWarning, stacklevel=1)
        return img

    monkeypatch.setattr(ImageOps, "exif_transpose", transpose)
    filters = list(warnings.filters)
    with pytest.raises(DataFormatError, match=r"cannot read image .*0\.png \(DecompressionBombW"):
        load_image_folder(tmp_path / "f")
    assert warnings.filters == filters  # the global warning filters are left as they were


def test_channel_stats_make_no_wide_copies() -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 1024, 1024), dtype=torch.uint8, generator=gen)
    with peak_growth_mib() as peak:  # 48 MiB of images: int32 copies and squares took 384 MiB
        mean, std = _channel_stats(images)
    assert peak["mib"] < 64, f"peak RSS rose by {peak['mib']:.0f} MiB"  # 12 MiB alone
    x = images[:2].double() / 255  # the statistics are exact: compare on a part, recomputed
    part_mean, part_std = _channel_stats(images[:2])
    torch.testing.assert_close(torch.tensor(part_mean, dtype=torch.float64), x.mean((0, 2, 3)))
    torch.testing.assert_close(
        torch.tensor(part_std, dtype=torch.float64), x.std((0, 2, 3), unbiased=False)
    )
    assert all(0.49 < m < 0.51 for m in mean) and all(0.28 < s < 0.30 for s in std)


# --- IDX files ---------------------------------------------------------------------------------


def _gzip_idx(path: Path, dims: tuple[int, ...], payload: int | None = None) -> Path:
    """A gzip IDX file of uint8 ``dims`` whose payload is ``payload`` zero bytes (default: what
    the header declares), compressed in 1 MiB steps (the test never holds it in memory)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    todo = int(np.prod(dims)) if payload is None else payload
    with open(path, "wb") as fh:
        fh.write(
            comp.compress(bytes([0, 0, 0x08, len(dims)]) + struct.pack(f">{len(dims)}I", *dims))
        )
        zeros = bytes(MIB)
        while todo:
            fh.write(comp.compress(zeros[: min(todo, MIB)]))
            todo -= min(todo, MIB)
        fh.write(comp.flush())
    return path


def test_idx_gzip_declaring_far_more_than_it_holds_is_refused_from_its_header(
    tmp_path: Path,
) -> None:
    p = _gzip_idx(tmp_path / "t10k-images-idx3-ubyte", (171196, 28, 28))  # 128 MiB of zeros
    assert p.stat().st_size < 300_000
    with peak_growth_mib() as peak, pytest.raises(
        DataFormatError,
        match=r"t10k-images-idx3-ubyte declares 134217664 payload bytes .* gzip file of \d+ "
        r"bytes, more than 100x its size; refused before inflating",
    ):  # fmt: skip
        read_idx(p)
    assert peak["mib"] < 32, f"peak RSS rose by {peak['mib']:.0f} MiB"


def test_idx_gzip_inflates_at_most_what_its_header_declares(tmp_path: Path) -> None:
    p = _gzip_idx(tmp_path / "labels-idx1-ubyte", (16,), payload=64 * MIB)  # 16 B + 64 MiB
    with peak_growth_mib() as peak, pytest.raises(
        DataFormatError,
        match=r"labels-idx1-ubyte is longer than its header says: the header \(16,\) promises 16 "
        r"payload bytes, the file holds more than 16",
    ):  # fmt: skip
        read_idx(p)
    assert peak["mib"] < 32, f"peak RSS rose by {peak['mib']:.0f} MiB"


def test_idx_pair_checks_the_label_count_before_inflating_the_images(tmp_path: Path) -> None:
    images = _gzip_idx(tmp_path / "t10k-images-idx3-ubyte", (76000, 28, 28))  # 57 MiB: < 64
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    labels.write_bytes(bytes([0, 0, 0x08, 1]) + struct.pack(">I", 1) + b"\0")
    with peak_growth_mib() as peak, pytest.raises(
        DataFormatError, match=r"holds 76000 images but .*t10k-labels-idx1-ubyte holds 1 labels"
    ):  # fmt: skip
        load_idx_pair(images, labels)
    assert peak["mib"] < 24, f"peak RSS rose by {peak['mib']:.0f} MiB"


# --- CIFAR .npz --------------------------------------------------------------------------------


def _npy_header(shape: tuple[int, ...], descr: str) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": descr, "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()


def _npz(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def _x(n: int) -> bytes:
    return _npy_header((n, 32, 32, 3), "|u1") + bytes(n * 32 * 32 * 3)


def test_npz_labels_member_bomb_is_refused_from_its_header(tmp_path: Path) -> None:
    p = tmp_path / "cifar10-test.npz"  # the review's probe, at 128 MiB
    n = 16 * MIB
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.writestr("x.npy", _x(1))
        with z.open("y.npy", "w", force_zip64=True) as fh:
            fh.write(_npy_header((n,), "<i8"))
            for _ in range(n * 8 // MIB):
                fh.write(bytes(MIB))
    assert p.stat().st_size < 400_000
    with peak_growth_mib() as peak, pytest.raises(
        DataFormatError,
        match=rf"cifar10-test\.npz: 'y' must hold 1 integer labels .*\({n},\) \(as declared by "
        r"member y\.npy; not loaded\)",
    ):  # fmt: skip
        read_cifar_npz(p)
    assert peak["mib"] < 32, f"peak RSS rose by {peak['mib']:.0f} MiB"


@pytest.mark.parametrize(
    ("name", "n", "limit"),
    [
        ("cifar10-test.npz", 10001, 10000),
        ("cifar10-train.npz", 50001, 50000),
        ("c.npz", 60001, 60000),
    ],
)
def test_npz_with_more_images_than_the_split_is_refused_from_its_header(
    tmp_path: Path, name: str, n: int, limit: int
) -> None:
    y = _npy_header((n,), "<i8")  # headers only: reading the data would fail differently
    p = _npz(tmp_path / name, {"x.npy": _npy_header((n, 32, 32, 3), "|u1"), "y.npy": y})
    with pytest.raises(
        DataFormatError,
        match=rf"{name}: member x\.npy declares {n} images, more than the {limit} of this "
        r"CIFAR-10 split; refused before loading",
    ):
        read_cifar_npz(p)


def test_npz_member_without_an_npy_header_is_refused_unread(tmp_path: Path) -> None:
    p = _npz(tmp_path / "c.npz", {"x.npy": _x(1), "y": bytes(4 * MIB)})  # np.load reads raw bytes
    with pytest.raises(DataFormatError, match=r"c\.npz is not a readable \.npz: member y has no "):
        read_cifar_npz(p)


def test_npz_within_the_limits_still_loads(tmp_path: Path) -> None:
    p = _npz(tmp_path / "cifar10-test.npz", {"x.npy": _x(3), "y": _npy_header((3, 1), "<i4")
                                             + np.array([1, 2, 9], "<i4").tobytes()})  # fmt: skip
    x, y = read_cifar_npz(p)
    assert x.shape == (3, 3, 32, 32) and y.tolist() == [1, 2, 9]
