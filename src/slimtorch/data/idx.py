"""Reader of the IDX format used by MNIST, Fashion-MNIST and KMNIST.

An IDX file is a big-endian header: two zero bytes, a dtype code, the number of dimensions
``d``, then ``d`` uint32 sizes, followed by the payload in C order. The files may be
gzip-compressed (detected from the gzip magic bytes, not the file name). The reader checks the
magic number, the dtype code, the dimensions and that the payload size matches the header
exactly, so a truncated or padded file never loads partially.

Gzip data is inflated in bounded steps: the header first, then at most the payload it declares
plus one byte (to tell a longer stream), straight into the array; nothing beyond that (and one
8 KiB read buffer) is ever inflated. A gzip file that declares more than 64 MiB of payload and
more than :data:`MAX_GZIP_RATIO` times its own size is refused from its header, before
inflating (the published files shrink 2-5x; a decompression bomb ~1000x).

Format: LeCun, Cortes and Burges, "The MNIST database of handwritten digits" (1998).

Example:
    >>> import gzip, pathlib, struct, tempfile
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> header = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 2, 28, 28)  # uint8, 2x28x28
    >>> p = d / "train-images-idx3-ubyte.gz"
    >>> _ = p.write_bytes(gzip.compress(header + bytes(2 * 28 * 28)))
    >>> images = read_idx(p)
    >>> images.shape, images.dtype
    ((2, 28, 28), dtype('uint8'))
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimtorch.core.errors import DataFormatError

logger = logging.getLogger(__name__)

__all__ = ["load_idx_pair", "read_idx"]

# IDX dtype code -> big-endian numpy dtype
_DTYPES: dict[int, str] = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}
_GZIP_MAGIC = b"\x1f\x8b"
# A gzip IDX file may declare at most this many times its own size of payload (beyond
# _RATIO_FREE_BYTES, which is always allowed); the published files shrink 2-5x.
MAX_GZIP_RATIO = 100
_RATIO_FREE_BYTES = 64 << 20
_CHUNK = 16 << 20  # payload bytes inflated (or read) per step


def _damaged(path: Path, exc: BaseException) -> DataFormatError:
    return DataFormatError(
        f"{path} is a damaged gzip file ({exc}); expected a complete gzip stream: delete "
        "the file and download it again"
    )


class _IdxSource:
    """An open IDX file whose header has been read and checked, payload not yet read.

    ``dims`` and ``dtype`` (big-endian) come from the header; :meth:`payload` reads the rest.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: Any = open(path, "rb")  # closed by close()
        try:
            self.file_size = os.fstat(self._fh.fileno()).st_size
            self.gz = self._fh.read(2) == _GZIP_MAGIC
            self._fh.seek(0)
            if self.gz:
                # GzipFile.read(n) inflates at most n bytes (past its 8 KiB buffer): it calls
                # zlib's decompressobj().decompress(data, max_length=n), member by member
                self._fh = gzip.GzipFile(fileobj=self._fh, mode="rb")
            self._read_header()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> _IdxSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        fileobj = getattr(self._fh, "fileobj", None)  # a GzipFile does not close its file
        self._fh.close()
        if fileobj is not None:
            fileobj.close()

    def _read(self, n: int) -> bytes:
        try:
            return bytes(self._fh.read(n))
        except (EOFError, OSError, zlib.error) as exc:
            if not self.gz:
                raise
            raise _damaged(self.path, exc) from exc

    def _read_header(self) -> None:
        path, data = self.path, self._read(4)
        if len(data) < 4 or data[0] != 0 or data[1] != 0:
            raise DataFormatError(
                f"{path} is not an IDX file: the first two bytes are "
                f"{data[:2].hex() or 'missing'}, expected 0000 (the IDX magic number); check "
                "that the file is an MNIST-style *-ubyte(.gz) file"
            )
        code, ndim = data[2], data[3]
        if code not in _DTYPES:
            raise DataFormatError(
                f"{path} has IDX dtype code 0x{code:02x}, expected one of "
                f"{', '.join(f'0x{c:02x}' for c in _DTYPES)}; the file is corrupt or not IDX"
            )
        if ndim < 1:
            raise DataFormatError(f"{path} declares {ndim} dimensions, expected at least 1")
        self.header = 4 + 4 * ndim
        data += self._read(4 * ndim)
        if len(data) < self.header:
            raise DataFormatError(
                f"{path} is truncated inside its header: {len(data)} bytes, expected at least "
                f"{self.header}; delete the file and download it again"
            )
        self.dims: tuple[int, ...] = struct.unpack(f">{ndim}I", data[4:])
        self.dtype = np.dtype(_DTYPES[code])
        # Python ints: no overflow on a bad header
        self.nbytes = math.prod(self.dims) * self.dtype.itemsize
        size = self.file_size
        if not self.gz:
            self._check_size(size - self.header)
        elif self.nbytes > max(_RATIO_FREE_BYTES, MAX_GZIP_RATIO * size):
            raise DataFormatError(
                f"{path} declares {self.nbytes} payload bytes (shape {tuple(self.dims)}) in a "
                f"gzip file of {size} bytes, more than {MAX_GZIP_RATIO}x its size; refused "
                "before inflating, as a possible decompression bomb: delete the file"
            )

    def _check_size(self, actual: int, longer: str | None = None) -> None:
        if actual != self.nbytes:
            what = "truncated" if actual < self.nbytes else "longer than its header says"
            holds = longer if longer is not None and actual > self.nbytes else str(actual)
            raise DataFormatError(
                f"{self.path} is {what}: the header {tuple(self.dims)} promises {self.nbytes} "
                f"payload bytes, the file holds {holds}; delete the file and download it again"
            )

    def payload(self) -> np.ndarray:
        """The payload, read (or inflated) in steps straight into the array, native order."""
        arr = np.empty(self.dims, dtype=self.dtype)
        view = arr.reshape(-1).view(np.uint8).data  # a memoryview of the array's bytes
        done = 0
        while done < self.nbytes:
            try:
                n = self._fh.readinto(view[done : done + _CHUNK])
            except (EOFError, OSError, zlib.error) as exc:
                if not self.gz:
                    raise
                raise _damaged(self.path, exc) from exc
            if not n:
                break
            done += n
        extra = len(self._read(1))  # at most one byte past the payload is inflated
        self._check_size(done + extra, longer=f"more than {self.nbytes}")
        return arr.astype(self.dtype.newbyteorder("="), copy=False)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (raw or gzip-compressed) into a numpy array in native byte order.

    Args:
        path: The ``*-idx?-ubyte`` or ``*-idx?-ubyte.gz`` file.

    Returns:
        The array with the shape given by the header.

    Raises:
        DataFormatError: Bad magic number, unknown dtype code, zero dimensions, a payload
            whose size differs from the header (the message gives both byte counts), or a gzip
            file declaring far more payload than it could hold (:data:`MAX_GZIP_RATIO`).

    Example:
        >>> import pathlib, struct, tempfile
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "labels-idx1-ubyte"
        >>> header = bytes([0, 0, 0x08, 1]) + struct.pack(">I", 3)  # uint8, 3 values
        >>> _ = p.write_bytes(header + bytes([7, 2, 1]))
        >>> read_idx(p)
        array([7, 2, 1], dtype=uint8)
        >>> _ = p.write_bytes(header + bytes([7, 2]))  # one byte short
        >>> read_idx(p)
        Traceback (most recent call last):
        ...
        slimtorch.core.errors.DataFormatError: ... is truncated: the header (3,) promises 3 ...
    """
    with _IdxSource(Path(path)) as src:
        return src.payload()


def load_idx_pair(
    images_path: str | os.PathLike[str], labels_path: str | os.PathLike[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read an IDX image file and its label file into ``(images, labels)`` tensors.

    Args:
        images_path: uint8 IDX file of shape ``(N, H, W)`` (or ``(N, C, H, W)``).
        labels_path: uint8 IDX file of shape ``(N,)``.

    Returns:
        ``images`` uint8 ``(N, C, H, W)`` and ``labels`` int64 ``(N,)``.

    Raises:
        DataFormatError: Wrong dtypes, ranks, or different sample counts (the image file's
            header is checked against the labels before its payload is read).

    Example:
        >>> import pathlib, struct, tempfile
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> images = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 2, 4, 4) + bytes(2 * 4 * 4)
        >>> labels = bytes([0, 0, 0x08, 1]) + struct.pack(">I", 2) + bytes([5, 0])
        >>> _ = (d / "images-idx3-ubyte").write_bytes(images)
        >>> _ = (d / "labels-idx1-ubyte").write_bytes(labels)
        >>> x, y = load_idx_pair(d / "images-idx3-ubyte", d / "labels-idx1-ubyte")
        >>> x.shape, x.dtype, y.tolist(), y.dtype
        (torch.Size([2, 1, 4, 4]), torch.uint8, [5, 0], torch.int64)
    """
    with _IdxSource(Path(images_path)) as src:
        dtype, dims = src.dtype.newbyteorder("="), tuple(src.dims)
        if dtype != np.uint8 or len(dims) not in (3, 4):
            raise DataFormatError(
                f"{images_path} holds {dtype} data of shape {dims}, expected uint8 "
                "images of shape (N, H, W) or (N, C, H, W)"
            )
        labels = read_idx(labels_path)
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise DataFormatError(
                f"{labels_path} holds {labels.dtype} data of shape {labels.shape}, expected "
                "integer labels of shape (N,)"
            )
        if labels.shape[0] != dims[0]:
            raise DataFormatError(
                f"{images_path} holds {dims[0]} images but {labels_path} holds "
                f"{labels.shape[0]} labels; the two files must come from the same split"
            )
        images = src.payload()  # a fresh, writable array: no copy needed
    x = torch.from_numpy(images)
    if x.ndim == 3:
        x = x.unsqueeze(1)  # (N, 1, H, W)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y
