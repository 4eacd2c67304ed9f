"""Fixtures of the data tests: an isolated environment and small IDX/dataset builders."""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from slimtorch.data import ImageDataset, clear_checksum_cache


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No SLIMTORCH_DATA, a private cache under tmp_path, a fresh checksum cache.

    Returns the cache folder (``<tmp>/xdg/slimtorch/data``).
    """
    monkeypatch.delenv("SLIMTORCH_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    clear_checksum_cache()
    return tmp_path / "xdg" / "slimtorch" / "data"


def _write_idx(path: Path, array: np.ndarray, *, gz: bool = False) -> Path:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
    arr = np.asarray(array)
    if arr.dtype == np.int32:
        arr = arr.astype(">i4")
    header = bytes([0, 0, codes[arr.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.fixture
def write_idx() -> Callable[..., Path]:
    """``write_idx(path, array, gz=False)`` writes an IDX file (uint8 or int32 arrays)."""
    return _write_idx


@pytest.fixture
def indexed_dataset() -> Callable[..., ImageDataset]:
    """``indexed_dataset(n, c=1, h=4, w=4)``: image i is filled with i % 256, label i % 3."""

    def make(n: int, c: int = 1, h: int = 4, w: int = 4) -> ImageDataset:
        images = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, c, h, w)
        return ImageDataset(
            name="indexed",
            images=images.contiguous(),
            labels=torch.arange(n) % 3,
            classes=("a", "b", "c"),
            mean=(0.5,) * c,
            std=(0.25,) * c,
        )

    return make
