"""Downloads that never leave a bad file behind: stream to a temporary file, verify, rename.

A file is fetched from the first mirror that answers; its size and published digests are checked
while it is still a temporary file in the target folder, and only a verified file is renamed
onto its final name (:func:`slimtorch.core.io.atomic_write`). A wrong checksum from one mirror
moves on to the next; if every mirror fails, :class:`ChecksumError` (some mirror served corrupt
bytes) or :class:`DataNotFoundError` (none could be reached) names every URL tried.

Example (two local ``file://`` mirrors; the first serves corrupt bytes):
    >>> import pathlib, tempfile
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> for mirror, data in (("bad", b"abd"), ("good", b"abc")):
    ...     (d / mirror).mkdir()
    ...     _ = (d / mirror / "labels.gz").write_bytes(data)
    >>> urls = [(d / m / "labels.gz").as_uri() for m in ("bad", "good")]
    >>> spec = FileSpec("labels.gz", md5="900150983cd24fb0d6963f7d28e17f72", size=3)
    >>> path = download_file(urls, d / "cache" / "labels.gz", spec)
    >>> path.relative_to(d), path.read_bytes()
    (PosixPath('cache/labels.gz'), b'abc')
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import os
import shutil
import zlib
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from slimtorch.core.errors import ChecksumError, DataFormatError, DataNotFoundError
from slimtorch.core.io import atomic_write
from slimtorch.data.checksum import FileSpec

logger = logging.getLogger(__name__)

__all__ = ["download_file", "extract_tar_members"]

_CHUNK = 1 << 20
_SCHEMES = ("http", "https", "file")
_USER_AGENT = "slimtorch-data/0.1"


def _check_digests(
    where: str, md5: hashlib._Hash, sha: hashlib._Hash, spec: FileSpec, nbytes: int
) -> None:
    if spec.size is not None and nbytes != spec.size:
        raise ChecksumError(
            f"{where} gave {nbytes} bytes, expected {spec.size} (the published size)"
        )
    if spec.sha256 is not None and sha.hexdigest() != spec.sha256.lower():
        raise ChecksumError(
            f"{where} has sha256 {sha.hexdigest()}, expected {spec.sha256} (the published value)"
        )
    if spec.md5 is not None and md5.hexdigest() != spec.md5.lower():
        raise ChecksumError(
            f"{where} has md5 {md5.hexdigest()}, expected {spec.md5} (the published value)"
        )


def _fetch(url: str, dest: Path, spec: FileSpec, timeout: float) -> None:
    import urllib.request  # lazily: keeps `import slimtorch.data` lean

    def write(tmp: str) -> None:
        md5, sha = hashlib.md5(), hashlib.sha256()
        nbytes, next_report = 0, 0.1
        req = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
        with urllib.request.urlopen(req, timeout=timeout) as resp, open(tmp, "wb") as out:
            announced = resp.headers.get("Content-Length")
            total = spec.size or int(announced or 0)
            while chunk := resp.read(_CHUNK):
                nbytes += len(chunk)
                if spec.size is not None and nbytes > spec.size:
                    raise ChecksumError(
                        f"{url} sent more than the published {spec.size} bytes of {spec.name}"
                    )
                md5.update(chunk)
                sha.update(chunk)
                out.write(chunk)
                if total and nbytes / total >= next_report:
                    logger.info("downloading %s: %3.0f%%", spec.name, 100 * nbytes / total)
                    next_report += 0.1
        if announced is not None and announced.isdigit() and nbytes != int(announced):
            raise ConnectionError(
                f"the transfer was cut short: {url} announced {announced} bytes of {spec.name} "
                f"and sent {nbytes}"
            )
        _check_digests(f"the download of {spec.name}", md5, sha, spec, nbytes)

    atomic_write(dest, write)


def download_file(
    urls: Sequence[str],
    dest: str | os.PathLike[str],
    spec: FileSpec | None = None,
    *,
    timeout: float = 60.0,
) -> Path:
    """Download ``dest`` from the first of ``urls`` that serves bytes matching ``spec``.

    Args:
        urls: Candidate URLs (``http``, ``https`` or ``file``), tried in order.
        dest: Final path; its folder is created. Nothing is written there unless verified.
        spec: Published size/md5/sha256 to check (default: nothing to check).
        timeout: Socket timeout in seconds per attempt.

    Returns:
        ``dest`` as a :class:`~pathlib.Path`.

    Raises:
        ChecksumError: At least one mirror served bytes with the wrong size or digest and no
            mirror served correct ones.
        DataNotFoundError: No mirror could be reached.

    Example (a local ``file://`` mirror serving the wrong bytes):
        >>> import pathlib, tempfile
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "mirror.gz").write_bytes(b"not the published file")
        >>> spec = FileSpec("train-labels-idx1-ubyte.gz", md5="d53e105ee54ea40749a09fcbcd1e9432")
        >>> download_file([(d / "mirror.gz").as_uri()], d / "cache" / "f.gz", spec)
        Traceback (most recent call last):
        ...
        slimtorch.core.errors.ChecksumError: no mirror served a valid f.gz (nothing was written ...
        >>> (d / "cache" / "f.gz").exists()
        False
    """
    if isinstance(urls, str):
        raise TypeError(f"urls must be a list of URLs, got the string {urls!r}; pass [{urls!r}]")
    if not urls:
        raise ValueError("download_file needs at least one URL")
    dest = Path(dest)
    spec = spec or FileSpec(dest.name)
    from urllib.error import URLError

    errors: list[str] = []
    corrupt = False
    for url in urls:
        scheme = urlsplit(url).scheme
        if scheme not in _SCHEMES:
            raise ValueError(f"unsupported URL scheme {scheme!r} in {url!r}; use {_SCHEMES}")
        logger.info("downloading %s from %s", dest.name, url)
        try:
            _fetch(url, dest, spec, timeout)
        except ChecksumError as exc:
            corrupt = True
            errors.append(f"{url}: {exc}")
            logger.warning("discarded %s from %s: %s", dest.name, url, exc)
        except (URLError, OSError, ValueError, http.client.HTTPException) as exc:
            errors.append(f"{url}: {type(exc).__name__}: {exc}")
            logger.warning("could not download %s from %s: %s", dest.name, url, exc)
        else:
            return dest
    tried = "\n  ".join(errors)
    if corrupt:
        raise ChecksumError(
            f"no mirror served a valid {dest.name} (nothing was written to {dest}):\n  {tried}\n"
            "retry later or fetch the file by hand and check it against the published checksum"
        )
    raise DataNotFoundError(
        f"could not download {dest.name}; tried:\n  {tried}\ncheck the network connection or "
        "copy the file by hand"
    )


def _copy_verified(src: IO[bytes], spec: FileSpec, where: str, tmp: str) -> None:
    with open(tmp, "wb") as fh:
        shutil.copyfileobj(src, fh, _CHUNK)
    md5, sha = hashlib.md5(), hashlib.sha256()
    with open(tmp, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            md5.update(chunk)
            sha.update(chunk)
    _check_digests(where, md5, sha, spec, os.path.getsize(tmp))


def extract_tar_members(
    archive: str | os.PathLike[str], prefix: str, members: Sequence[FileSpec], dest_dir: Path
) -> list[Path]:
    """Copy the named regular files out of a (gzipped) tar archive, verifying each one.

    Only the listed members are read; their names are chosen here, never taken from the
    archive, so a crafted archive cannot write outside ``dest_dir``.

    Args:
        archive: The ``.tar`` or ``.tar.gz`` file.
        prefix: Folder inside the archive, e.g. ``"cifar-10-batches-py/"``.
        members: The files to extract, with their published digests.
        dest_dir: Where to write them (each written atomically).

    Returns:
        The written paths, in the order of ``members``.

    Raises:
        DataFormatError: A member is missing or is not a regular file.
        ChecksumError: A member's digest differs from the published one.

    Example (a small archive standing in for ``cifar-10-python.tar.gz``):
        >>> import io, pathlib, tarfile, tempfile
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> archive = d / "batches.tar.gz"
        >>> with tarfile.open(archive, "w:gz") as tar:
        ...     info = tarfile.TarInfo("cifar-10-batches-py/test_batch")
        ...     info.size = 3
        ...     tar.addfile(info, io.BytesIO(b"abc"))
        >>> specs = [FileSpec("test_batch", md5="900150983cd24fb0d6963f7d28e17f72")]
        >>> out = extract_tar_members(archive, "cifar-10-batches-py/", specs, d / "out")
        >>> [p.relative_to(d) for p in out], out[0].read_bytes()
        ([PosixPath('out/test_batch')], b'abc')
    """
    import tarfile

    try:
        return _extract(tarfile.open(archive, mode="r:*"), archive, prefix, members, dest_dir)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        if isinstance(exc, OSError) and not isinstance(exc, gzip.BadGzipFile):
            raise  # a full disk, an unwritable dest_dir: the message names the path
        raise DataFormatError(
            f"{archive} is not a readable tar archive ({type(exc).__name__}: {exc}); it is "
            "truncated or corrupt: delete it and download it again"
        ) from exc


def _extract(
    tar: Any, archive: str | os.PathLike[str], prefix: str, members: Sequence[FileSpec], dest: Path
) -> list[Path]:
    """The loop of :func:`extract_tar_members` over an open archive (closed after)."""
    out: list[Path] = []
    with tar:
        for spec in members:
            try:
                info = tar.getmember(prefix + spec.name)
            except KeyError:
                raise DataFormatError(
                    f"{archive} has no member {prefix + spec.name}; expected the official "
                    "archive: delete it and download it again"
                ) from None
            if not info.isfile():
                raise DataFormatError(f"{archive}: {info.name} is not a regular file")
            src = tar.extractfile(info)
            if src is None:  # pragma: no cover - isfile() guarantees a stream
                raise DataFormatError(f"{archive}: cannot read {info.name}")
            out.append(
                atomic_write(
                    dest / spec.name,
                    partial(_copy_verified, src, spec, f"{archive}:{info.name}"),
                )
            )
    return out
