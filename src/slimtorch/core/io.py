"""Atomic file writes: a temporary file in the same folder, fsync, rename, fsync the folder.

A reader never sees a half-written file, and a crash mid-write leaves the old file intact.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (a rename into it) to disk, as far as the system allows: a
    no-op where folders cannot be opened (Windows, a folder writable but not readable) or
    synced (some network file systems). The rename has happened either way."""
    if os.name != "posix":
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


_OS_ERROR = re.compile(r"\(os error (\d+)\)")
# torch's archive writer reports a failed write only as a position mismatch
_TORCH_WRITE_FAILED = ("unexpected pos", "PytorchStreamWriter failed writing")
# no room: a full disk, the file-size limit, a quota (EIO: torch's writer, which says nothing)
_NO_ROOM = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO}


def _write_failure(exc: Exception, path: Path) -> OSError | None:
    """The ``OSError`` naming the file and the free space that a failed write stands for: an
    ``OSError`` that names no file (``[Errno 28] No space left on device``), or a writer
    library's own error (safetensors' "I/O error: ... (os error 28)", torch's "unexpected
    pos"); None for other errors, and for an ``OSError`` that already names its file."""
    if isinstance(exc, OSError):
        if exc.filename is not None or exc.errno is None:
            return None
        err, text = exc.errno, exc.strerror or str(exc)
    else:
        text = str(exc)
        code = _OS_ERROR.search(text)
        if code is None and not any(s in text for s in _TORCH_WRITE_FAILED):
            return None
        err = int(code.group(1)) if code is not None else errno.EIO
    first = text.strip().splitlines()[0] if text.strip() else os.strerror(err)
    if err not in _NO_ROOM:
        return OSError(err, f"could not write {path} ({first})")
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    return OSError(
        err,
        f"could not write {path} ({first}; {free}); free disk space, raise the file-size "
        "limit, or write elsewhere",
    )


def _host_token() -> str:
    """This machine and pid namespace, hashed: a pid means a process only where it was taken
    (another NFS client, a container sharing the folder, has its own pids)."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return hashlib.sha1(f"{socket.gethostname()}:{namespace}".encode()).hexdigest()[:8]


_HOST = _host_token()


def temp_name(path: Path) -> str:
    """The name of a temporary sibling of ``path`` (``.<name>.<pid>-<host>.<random>.tmp``):
    the writing process's id and its machine let a later write on the same machine remove what
    a killed one left (see :func:`remove_stale_temps`)."""
    return f".{path.name}.{os.getpid()}-{_HOST}.{uuid.uuid4().hex[:12]}.tmp"


_WINDOWS = os.name == "nt"


def _alive(pid: int) -> bool:
    if _WINDOWS:  # signal 0 there is CTRL_C_EVENT, sent to the pid's process group
        return True  # no safe probe: keep the file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # another user's process, or no way to tell: keep its file
    return True


@contextlib.contextmanager
def scratch_dir(beside: Path) -> Iterator[Path]:
    """A temporary folder next to ``beside``, named by :func:`temp_name` (so that what a killed
    process left is swept: :func:`remove_stale_temps` runs first), removed when the block ends.

    Example:
        >>> import tempfile, pathlib; d = pathlib.Path(tempfile.mkdtemp())
        >>> with scratch_dir(d / "archive.tar.gz") as tmp:
        ...     _ = (tmp / "part").write_bytes(b"..")
        >>> list(d.iterdir())
        []
    """
    remove_stale_temps(beside)
    path = beside.parent / temp_name(beside)
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def remove_stale_temps(path: str | os.PathLike[str]) -> list[str]:
    """Remove the temporary siblings of ``path`` that a process killed mid-write left (a
    SIGKILL, the OOM killer: no cleanup ran). Only files and folders named by
    :func:`temp_name` whose process no longer runs on this machine are removed; returns their
    names.

    Example:
        >>> import tempfile, pathlib; d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / ".m.json.999999999.0123.tmp").write_text("left by a killed writer")
        >>> remove_stale_temps(d / "m.json")
        ['.m.json.999999999.0123.tmp']
    """
    path = Path(path)
    # a pid, with this machine's token or none (names written before the token existed)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)(?:-([0-9a-f]{{8}}))?\.[0-9a-f]+\.tmp")
    removed: list[str] = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or match.group(2) not in (None, _HOST) or _alive(int(match.group(1))):
            continue  # another machine's writer cannot be checked from here: its file stays
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue
        removed.append(entry.name)
    return removed


@contextlib.contextmanager
def folder_lock(path: str | os.PathLike[str], *, shared: bool) -> Iterator[None]:
    """Hold an advisory lock for the folder ``path``, taken on its parent directory (no lock
    file is left behind): exclusive for a writer that swaps the folder, shared for readers of
    several of its files, so a reader never pairs one save's config with another's weights and
    two saves never undo each other's swap. Where no lock can be taken (no ``fcntl`` on
    Windows, a file system without locks, a missing parent) the body runs unlocked.

    Example:
        >>> import tempfile, pathlib
        >>> with folder_lock(pathlib.Path(tempfile.mkdtemp()) / "model", shared=True):
        ...     pass
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path = Path(path)
    try:  # a link (latest -> run-3) is saved into its target: lock the target's folder
        fd = os.open((path.resolve() if path.is_symlink() else path).parent, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):  # a file system without locks: run unlocked
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then atomically rename ``tmp_path`` onto ``path``.

    Example:
        >>> import tempfile, pathlib; d = pathlib.Path(tempfile.mkdtemp())
        >>> from safetensors.torch import save_file
        >>> tensors = {"weight": torch.ones(2, 2)}
        >>> atomic_write(d / "model.safetensors", lambda p: save_file(tensors, p)).name
        'model.safetensors'
        >>> [f.name for f in d.iterdir()]  # no temporary file left behind
        ['model.safetensors']
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = str(path.parent / temp_name(path))
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # created 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        failed = _write_failure(exc, path) if isinstance(exc, Exception) else None
        if failed is not None:
            raise failed from exc
        raise
    fsync_dir(path.parent)  # the rename itself survives a power loss
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""

    def _write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    return atomic_write(path, _write)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    """JSON form of what ``json`` cannot write: numpy/torch numbers and arrays by value (as
    ``str`` they would come back as strings), anything else (paths, dtypes) as ``str``."""
    tolist = getattr(obj, "tolist", None)
    if callable(tolist) and type(obj).__module__.split(".")[0] in ("numpy", "torch"):
        return tolist()
    return str(obj)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically.

    Numpy and torch scalars and arrays are written as numbers and lists; other objects JSON
    cannot write (paths, dtypes) as their ``str``.

    Example:
        >>> import tempfile, pathlib, numpy as np; d = pathlib.Path(tempfile.mkdtemp())
        >>> read_json(atomic_write_json(d / "c.json", {"bits": np.int64(8), "p": d.name}))["bits"]
        8
    """
    text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default)
    return atomic_write_text(path, text + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file, raising ``ValueError`` that names the file when it is malformed."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:  # nested too deep
        raise ValueError(f"{path} is not valid JSON ({exc}); fix or regenerate the file") from exc
