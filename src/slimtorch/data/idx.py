"""Reader of the IDX format used by MNIST, Fashion-MNIST and KMNIST.

An IDX file is a big-endian header: two zero bytes, a dtype code, the number of dimensions
``d``, then ``d`` uint32 sizes, followed by the payload in C order. The files may be
gzip-compressed (detected from the gzip magic bytes, not the file name). The reader checks the
magic number, the dtype code, the dimensions and that the payload size matches the header
exactly, so a truncated or padded file never loads partially.

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


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as fh:
        raw = fh.read()
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:
        raise DataFormatError(
            f"{path} is a damaged gzip file ({exc}); expected a complete gzip stream: delete "
            "the file and download it again"
        ) from exc


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (raw or gzip-compressed) into a numpy array in native byte order.

    Args:
        path: The ``*-idx?-ubyte`` or ``*-idx?-ubyte.gz`` file.

    Returns:
        The array with the shape given by the header.

    Raises:
        DataFormatError: Bad magic number, unknown dtype code, zero dimensions or a payload
            whose size differs from the header (the message gives both byte counts).

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
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataFormatError(
            f"{path} is not an IDX file: the first two bytes are {data[:2].hex() or 'missing'}, "
            "expected 0000 (the IDX magic number); check that the file is an MNIST-style "
            "*-ubyte(.gz) file"
        )
    code, ndim = data[2], data[3]
    if code not in _DTYPES:
        raise DataFormatError(
            f"{path} has IDX dtype code 0x{code:02x}, expected one of "
            f"{', '.join(f'0x{c:02x}' for c in _DTYPES)}; the file is corrupt or not IDX"
        )
    if ndim < 1:
        raise DataFormatError(f"{path} declares {ndim} dimensions, expected at least 1")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataFormatError(
            f"{path} is truncated inside its header: {len(data)} bytes, expected at least "
            f"{header}; delete the file and download it again"
        )
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_DTYPES[code])
    expected = math.prod(dims) * dtype.itemsize  # Python ints: no overflow on a bad header
    actual = len(data) - header
    if actual != expected:
        what = "truncated" if actual < expected else "longer than its header says"
        raise DataFormatError(
            f"{path} is {what}: the header {tuple(dims)} promises {expected} payload bytes, the "
            f"file holds {actual}; delete the file and download it again"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=False)


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
        DataFormatError: Wrong dtypes, ranks, or different sample counts.

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
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise DataFormatError(
            f"{images_path} holds {images.dtype} data of shape {images.shape}, expected uint8 "
            "images of shape (N, H, W) or (N, C, H, W)"
        )
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataFormatError(
            f"{labels_path} holds {labels.dtype} data of shape {labels.shape}, expected "
            "integer labels of shape (N,)"
        )
    if labels.shape[0] != images.shape[0]:
        raise DataFormatError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
            f"{labels.shape[0]} labels; the two files must come from the same split"
        )
    x = torch.from_numpy(images.copy())
    if x.ndim == 3:
        x = x.unsqueeze(1)  # (N, 1, H, W)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y
