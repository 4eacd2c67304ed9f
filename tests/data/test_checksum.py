from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from slimtorch.core.errors import ChecksumError
from slimtorch.data import checksum
from slimtorch.data.checksum import FileSpec, clear_checksum_cache, file_digest, verify_file


@pytest.fixture
def blob(tmp_path: Path) -> Path:
    p = tmp_path / "blob.bin"
    p.write_bytes(b"slimtorch" * 1000)
    clear_checksum_cache()
    return p


def test_file_digest_matches_hashlib(blob: Path) -> None:
    data = blob.read_bytes()
    assert file_digest(blob, "md5") == hashlib.md5(data).hexdigest()
    assert file_digest(blob) == hashlib.sha256(data).hexdigest()


def test_verify_ok_and_mismatch(blob: Path) -> None:
    sha = hashlib.sha256(blob.read_bytes()).hexdigest()
    assert verify_file(blob, sha256=sha, size=9000) is True
    assert verify_file(blob) is False  # nothing known to check
    with pytest.raises(ChecksumError, match=r"blob\.bin has md5 .* expected 0+"):
        verify_file(blob, md5="0" * 32)
    with pytest.raises(ChecksumError, match="has 9000 bytes, expected 9001"):
        verify_file(blob, size=9001)


def test_successful_check_is_cached_until_the_file_changes(
    blob: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real = checksum.file_digest

    def counting(path: str | os.PathLike[str], algorithm: str = "sha256") -> str:
        calls.append(algorithm)
        return real(path, algorithm)

    monkeypatch.setattr(checksum, "file_digest", counting)
    md5 = hashlib.md5(blob.read_bytes()).hexdigest()
    verify_file(blob, md5=md5)
    verify_file(blob, md5=md5)
    assert calls == ["md5"]
    # same size, new content and mtime: hashed again, and the change is caught
    blob.write_bytes(b"x" * 9000)
    st = blob.stat()
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(ChecksumError):
        verify_file(blob, md5=md5)
    assert calls == ["md5", "md5"]


def test_filespec_has_checksum() -> None:
    assert FileSpec("a", md5="x").has_checksum
    assert not FileSpec("a", size=3).has_checksum
