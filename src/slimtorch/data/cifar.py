"""Readers of CIFAR-10: the original python pickle batches and a plain ``.npz`` file.

The original release (``cifar-10-python.tar.gz``, folder ``cifar-10-batches-py``) stores each
batch as a Python pickle. Unpickling can run arbitrary code, so these files are read with a
restricted :class:`pickle.Unpickler` whose ``find_class`` admits only the three numpy globals
needed to rebuild an array (``_reconstruct``, ``ndarray``, ``dtype``) and refuses everything else,
and a known file is checked against its published md5 before it is parsed at all.

Dataset: Krizhevsky, "Learning Multiple Layers of Features from Tiny Images" (2009).

Example (a two-image stand-in for ``cifar-10-batches-py/test_batch``):
    >>> import pathlib, pickle, tempfile
    >>> import numpy as np
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "test_batch"
    >>> batch = {"data": np.zeros((2, 3 * 32 * 32), np.uint8), "labels": [3, 8]}
    >>> _ = path.write_bytes(pickle.dumps(batch, protocol=4))
    >>> x, y = read_cifar_batch(path)
    >>> x.shape, x.dtype, y.tolist()
    (torch.Size([2, 3, 32, 32]), torch.uint8, [3, 8])
    >>> x, y = read_cifar_batch(path, md5=CIFAR10_MD5["test_batch"])  # not the published file
    Traceback (most recent call last):
    ...
    slimtorch.core.errors.ChecksumError: ...test_batch has md5 ..., expected 40351d587109b95175f...
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimtorch.core.errors import DataFormatError
from slimtorch.data.checksum import verify_file

logger = logging.getLogger(__name__)

__all__ = [
    "CIFAR10_ARCHIVE_MD5",
    "CIFAR10_CLASSES",
    "CIFAR10_MD5",
    "SafeUnpickler",
    "read_cifar_batch",
    "read_cifar_batches",
    "read_cifar_npz",
]

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
# Published md5 of each file of cifar-10-batches-py (https://www.cs.toronto.edu/~kriz/cifar.html)
CIFAR10_MD5: dict[str, str] = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
CIFAR10_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"  # cifar-10-python.tar.gz

# The only globals a CIFAR batch pickle needs (numpy >= 2 renamed numpy.core to numpy._core).
# Protocol 5 (Python 3.14's default) stores arrays as a bytearray rebuilt by numeric._frombuffer,
# which only views bytes as an array of a given dtype and shape.
_ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)
_MAX_PICKLE_BYTES = 512 * 1024 * 1024
# Most images a CIFAR-10 .npz may declare: its split's size by the catalog's file names, else
# the whole set (50000 train + 10000 test).
_NPZ_MAX_IMAGES: dict[str, int] = {"cifar10-train.npz": 50000, "cifar10-test.npz": 10000}
_NPZ_DEFAULT_MAX_IMAGES = 60000


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``codecs.encode`` as protocol-2 pickles of ``bytes`` use it, for latin-1 only."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise DataFormatError(
            f"refusing _codecs.encode with encoding {encoding!r} in a pickle; a CIFAR batch "
            "encodes bytes as latin-1 only"
        )
    return text.encode("latin1")


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays, lists, dicts, strings and numbers, and nothing
    else: any other global (``os.system``, ``builtins.eval``...) raises
    :class:`~slimtorch.core.errors.DataFormatError` before it is looked up.

    Example:
        >>> import io, pickle
        >>> blob = pickle.dumps({"labels": [3, 8]}, protocol=4)
        >>> SafeUnpickler(io.BytesIO(blob), encoding="latin1").load()
        {'labels': [3, 8]}
        >>> SafeUnpickler(io.BytesIO(pickle.dumps(print))).load()
        Traceback (most recent call last):
        ...
        slimtorch.core.errors.DataFormatError: refusing to load the global builtins.print ...
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode  # Python 3 writes bytes this way at protocols 0-2
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise DataFormatError(
            f"refusing to load the global {module}.{name} from a pickle: a CIFAR batch may only "
            f"reference {', '.join(sorted(f'{m}.{n}' for m, n in _ALLOWED_GLOBALS))}; the file "
            "is not an original CIFAR batch (possibly malicious): do not use it"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise DataFormatError("refusing a pickle with persistent ids; not a CIFAR batch file")


def _get(entry: dict[Any, Any], key: str) -> Any:
    for k in (key, key.encode("latin1")):
        if k in entry:
            return entry[k]
    return None


def read_cifar_batch(
    path: str | os.PathLike[str], *, md5: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one CIFAR python batch into ``(images, labels)``.

    Args:
        path: A ``data_batch_*`` or ``test_batch`` file.
        md5: Published md5 of the file; when given it is checked before parsing.

    Returns:
        ``images`` uint8 ``(N, 3, 32, 32)`` and ``labels`` int64 ``(N,)``.

    Raises:
        ChecksumError: The md5 differs from ``md5``.
        DataFormatError: The pickle references a forbidden global, or its content is not a CIFAR
            batch (missing keys, wrong array shape, labels outside 0..9).

    Example:
        >>> import pathlib, pickle, tempfile
        >>> import numpy as np
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "data_batch_1"
        >>> batch = {"data": np.full((4, 3072), 255, np.uint8), "labels": [0, 1, 2, 9]}
        >>> _ = path.write_bytes(pickle.dumps(batch, protocol=4))
        >>> x, y = read_cifar_batch(path)
        >>> x.shape, y.dtype
        (torch.Size([4, 3, 32, 32]), torch.int64)
    """
    path = Path(path)
    if md5 is not None:
        verify_file(path, md5=md5)
    size = path.stat().st_size
    if size > _MAX_PICKLE_BYTES:
        raise DataFormatError(f"{path} has {size} bytes, far more than a CIFAR batch (~31 MB)")
    blob = path.read_bytes()
    try:
        entry = SafeUnpickler(io.BytesIO(blob), encoding="latin1").load()
    except DataFormatError as exc:
        raise DataFormatError(f"{path}: {exc}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise DataFormatError(
            f"{path} is not a readable CIFAR batch pickle ({type(exc).__name__}: {exc}); delete "
            "it and extract cifar-10-python.tar.gz again"
        ) from exc
    if not isinstance(entry, dict):
        raise DataFormatError(f"{path} holds a {type(entry).__name__}, expected a dict batch")
    data, labels = _get(entry, "data"), _get(entry, "labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DataFormatError(
            f"{path}: 'data' must be a uint8 array of shape (N, 3072), got "
            f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}"
        )
    if data.shape[1] != 3 * 32 * 32:
        raise DataFormatError(f"{path}: 'data' has {data.shape[1]} columns, expected 3072")
    raw = np.asarray(labels)
    if raw.dtype.kind not in "iu" and raw.size:  # 1.7 must not load as class 1, True as 1
        raise DataFormatError(
            f"{path}: 'labels' must be integers, got {raw.dtype} values such as "
            f"{raw.reshape(-1)[:3].tolist()}"
        )
    y = raw.astype(np.int64)
    if y.shape != (data.shape[0],):
        raise DataFormatError(
            f"{path}: {data.shape[0]} images but 'labels' has shape {y.shape}; expected one "
            "label per image"
        )
    _check_labels(path, y)
    x = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32).copy())
    return x, torch.from_numpy(y)


def read_cifar_batches(
    paths: Sequence[str | os.PathLike[str]], *, verify: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read and concatenate several CIFAR-10 batches, checking known files' md5 first.

    Args:
        paths: Batch files, e.g. ``data_batch_1`` ... ``data_batch_5``.
        verify: Check files whose name has a published md5 (:data:`CIFAR10_MD5`).

    Returns:
        ``images`` uint8 ``(N, 3, 32, 32)`` and ``labels`` int64 ``(N,)``.

    Example (two small stand-ins for ``data_batch_1`` ... ``data_batch_5``):
        >>> import pathlib, pickle, tempfile
        >>> import numpy as np
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> for i, n in ((1, 3), (2, 2)):
        ...     batch = {"data": np.zeros((n, 3072), np.uint8), "labels": [i] * n}
        ...     _ = (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=4))
        >>> paths = [folder / "data_batch_1", folder / "data_batch_2"]
        >>> x, y = read_cifar_batches(paths, verify=False)  # they are not the published files
        >>> x.shape, y.tolist()
        (torch.Size([5, 3, 32, 32]), [1, 1, 1, 2, 2])
        >>> x, y = read_cifar_batches(paths)
        Traceback (most recent call last):
        ...
        slimtorch.core.errors.ChecksumError: ...data_batch_1 has md5 ..., expected c99cafc152244...
    """
    if not paths:
        raise ValueError("read_cifar_batches needs at least one batch file")
    xs, ys = [], []
    for p in paths:
        md5 = CIFAR10_MD5.get(Path(p).name) if verify else None
        x, y = read_cifar_batch(p, md5=md5)
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def _npy_header(path: Path, archive: zipfile.ZipFile, name: str) -> tuple[Any, np.dtype]:
    """The shape and dtype an ``.npz`` member declares in its ``.npy`` header (no data read)."""
    fmt = np.lib.format
    try:
        with archive.open(name) as fh:
            version = fmt.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = fmt.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, _, dtype = fmt.read_array_header_2_0(fh)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
    except (ValueError, OSError, EOFError, RuntimeError, NotImplementedError) as exc:
        raise DataFormatError(
            f"{path} is not a readable .npz: member {name} has no valid .npy header ({exc}); "
            "save it with np.savez(path, x=images_uint8_nhwc, y=labels)"
        ) from exc
    if dtype.hasobject:
        raise DataFormatError(
            f"{path} is not a readable .npz without pickled objects: member {name} declares "
            f"{dtype} data; save it with np.savez(path, x=images_uint8_nhwc, y=labels)"
        )
    return shape, dtype


def _check_npz_members(path: Path, archive: zipfile.ZipFile) -> None:
    """Refuse, from the members' ``.npy`` headers and before any data is read, an ``x`` or
    ``y`` whose shape or dtype is not CIFAR's, or that holds more images than the split."""
    names = set(archive.namelist())
    member = {k: k if k in names else f"{k}.npy" for k in ("x", "y")}  # as np.load finds them
    shape, dtype = _npy_header(path, archive, member["x"])
    if dtype != np.uint8 or len(shape) != 4 or tuple(shape[1:]) != (32, 32, 3):
        raise DataFormatError(
            f"{path}: 'x' must be uint8 of shape (N, 32, 32, 3), got {dtype} {shape} (as "
            f"declared by member {member['x']}; not loaded)"
        )
    n, limit = shape[0], _NPZ_MAX_IMAGES.get(path.name, _NPZ_DEFAULT_MAX_IMAGES)
    if n > limit:
        raise DataFormatError(
            f"{path}: member {member['x']} declares {n} images, more than the {limit} of "
            f"this CIFAR-10 split; refused before loading: the file is not CIFAR-10"
        )
    shape, dtype = _npy_header(path, archive, member["y"])
    if dtype.kind not in "iu" or tuple(shape) not in ((n,), (n, 1)):
        raise DataFormatError(
            f"{path}: 'y' must hold {n} integer labels of shape (N,), got {dtype} {shape} (as "
            f"declared by member {member['y']}; not loaded)"
        )


def read_cifar_npz(path: str | os.PathLike[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Read CIFAR-10 from an ``.npz`` holding ``x`` uint8 ``(N, 32, 32, 3)`` and ``y`` ``(N,)``.

    The file is opened with ``allow_pickle=False``, so it cannot run code. The shape and dtype
    each member declares in its ``.npy`` header are checked before its data is read (a small
    compressed file can declare gigabytes): at most the split's images (50000 in
    ``cifar10-train.npz``, 10000 in ``cifar10-test.npz``, 60000 under another name).

    Returns:
        ``images`` uint8 ``(N, 3, 32, 32)`` and ``labels`` int64 ``(N,)``.

    Raises:
        DataFormatError: Missing keys, wrong dtype or shape, more images than the split,
            labels outside 0..9.

    Example:
        >>> import pathlib, tempfile
        >>> import numpy as np
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "cifar10-train.npz"
        >>> np.savez(path, x=np.zeros((2, 32, 32, 3), np.uint8), y=np.array([6, 9]))
        >>> x, y = read_cifar_npz(path)
        >>> x.shape, y.tolist()
        (torch.Size([2, 3, 32, 32]), [6, 9])
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic not in (b"PK\x03\x04", b"PK\x05\x06"):  # np.load would read it as a .npy
            raise ValueError(f"not a zip archive: it starts with {magic!r}")
        with np.load(path, allow_pickle=False) as npz:
            missing = {"x", "y"} - set(npz.files)
            if missing:
                raise DataFormatError(
                    f"{path} lacks the array(s) {', '.join(sorted(missing))}; expected 'x' "
                    f"(N, 32, 32, 3) uint8 and 'y' (N,), found {', '.join(npz.files) or 'none'}"
                )
            _check_npz_members(path, npz.zip)
            x, y = npz["x"], npz["y"]
    except DataFormatError:
        raise
    except (ValueError, OSError, EOFError, TypeError, zipfile.BadZipFile) as exc:
        # TypeError: a .npy under the .npz name (np.load returns an array, not an archive)
        raise DataFormatError(
            f"{path} is not a readable .npz without pickled objects ({exc}); save it with "
            "np.savez(path, x=images_uint8_nhwc, y=labels)"
        ) from exc
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3):
        raise DataFormatError(
            f"{path}: 'x' must be uint8 of shape (N, 32, 32, 3), got {x.dtype} {x.shape}"
        )
    y = np.asarray(y).reshape(-1) if np.asarray(y).ndim == 2 and y.shape[1] == 1 else y
    if y.dtype.kind not in "iu" or y.shape != (x.shape[0],):
        raise DataFormatError(
            f"{path}: 'y' must hold {x.shape[0]} integer labels of shape (N,), got "
            f"{y.dtype} {y.shape}"
        )
    y = y.astype(np.int64)
    _check_labels(path, y)
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))  # (N, 3, 32, 32)
    return images, torch.from_numpy(y)


def _check_labels(path: Path, y: np.ndarray) -> None:
    if y.size and (int(y.min()) < 0 or int(y.max()) >= len(CIFAR10_CLASSES)):
        raise DataFormatError(
            f"{path}: labels must lie in [0, 9], found values in [{int(y.min())}, {int(y.max())}]"
        )
