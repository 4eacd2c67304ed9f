"""File checksums (md5/sha256) with a per-process cache of successful checks.

Known dataset files are verified against their published digests every time they are loaded.
Hashing a 26 MB file costs about 0.1 s; the result of a successful check is cached, keyed by
the resolved path, size and modification time, so repeated loads in one process are cheap and a
file that changes on disk is hashed again.

Example:
    >>> import pathlib, tempfile
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "abc.txt"
    >>> _ = p.write_bytes(b"abc")
    >>> verify_file(p, md5="900150983cd24fb0d6963f7d28e17f72", size=3)
    True
    >>> verify_file(p, md5="0" * 32)
    Traceback (most recent call last):
    ...
    slimtorch.core.errors.ChecksumError: ...abc.txt has md5 900150983cd24fb0d6963f7d28e17f72, ...
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from slimtorch.core.errors import ChecksumError

logger = logging.getLogger(__name__)

__all__ = ["FileSpec", "clear_checksum_cache", "file_digest", "verify_file"]

_CHUNK = 1 << 20
_VERIFIED: set[tuple[str, int, int, str, str]] = set()


@dataclass(frozen=True)
class FileSpec:
    """A file a dataset needs, with its published digests and size where known.

    Attributes:
        name: File name (relative to the dataset folder).
        md5: Published md5 hex digest, or ``None``.
        sha256: Published sha256 hex digest, or ``None``.
        size: Size in bytes, or ``None``.
    """

    name: str
    md5: str | None = None
    sha256: str | None = None
    size: int | None = None

    @property
    def has_checksum(self) -> bool:
        """Whether a published digest is known for this file."""
        return self.md5 is not None or self.sha256 is not None


def file_digest(path: str | os.PathLike[str], algorithm: str = "sha256") -> str:
    """The hex digest of a file, read in 1 MiB chunks.

    Example:
        >>> import pathlib, tempfile
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "abc.txt"
        >>> _ = p.write_bytes(b"abc")
        >>> file_digest(p)
        'ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad'
        >>> file_digest(p, "md5")
        '900150983cd24fb0d6963f7d28e17f72'
    """
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def clear_checksum_cache() -> None:
    """Forget every cached successful check (the next load hashes again)."""
    _VERIFIED.clear()


def verify_file(
    path: str | os.PathLike[str],
    *,
    md5: str | None = None,
    sha256: str | None = None,
    size: int | None = None,
) -> bool:
    """Check ``path`` against its published size and digests.

    sha256 is preferred when both digests are given (one hash pass is enough). A successful
    check is cached for the process (keyed by path, size and mtime).

    Args:
        path: The file to check.
        md5: Expected md5 hex digest.
        sha256: Expected sha256 hex digest.
        size: Expected size in bytes.

    Returns:
        ``True`` if a digest or size was checked, ``False`` when nothing was known to check.

    Raises:
        ChecksumError: The size or digest differs from the published value.

    Example:
        >>> import pathlib, tempfile
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "abc.txt"
        >>> _ = p.write_bytes(b"abc")
        >>> verify_file(p, md5="900150983cd24fb0d6963f7d28e17f72")
        True
        >>> verify_file(p)  # nothing known to check
        False
        >>> verify_file(p, size=4)
        Traceback (most recent call last):
        ...
        slimtorch.core.errors.ChecksumError: ...abc.txt has 3 bytes, expected 4 (the published ...
    """
    path = Path(path)
    st = path.stat()
    if size is not None and st.st_size != size:
        raise ChecksumError(
            f"{path} has {st.st_size} bytes, expected {size} (the published size); the file is "
            "truncated or corrupt: delete it and download it again"
        )
    if sha256 is not None:
        algo, expected = "sha256", sha256.lower()
    elif md5 is not None:
        algo, expected = "md5", md5.lower()
    else:
        return size is not None
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, algo, expected)
    if key in _VERIFIED:
        return True
    actual = file_digest(path, algo)
    if actual != expected:
        raise ChecksumError(
            f"{path} has {algo} {actual}, expected {expected} (the published value); the file "
            "is corrupt or incomplete: delete it and download it again"
        )
    logger.debug("verified %s (%s)", path, algo)
    _VERIFIED.add(key)
    return True
