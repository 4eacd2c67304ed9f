"""The compact and packed sparse files check the format and version in their metadata on load:
each names the loader of the other, an unknown format, or a newer slimtorch. Both loaded any
such file silently (or failed with "truncated or was not written by ..." and no loader named)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_prune_storage import _assert_bit_equal as assert_bit_equal
from torch import nn

from slimtorch.prune import MagnitudeConfig, load_compact, prune_, save_compact
from slimtorch.sparse import load_packed, save_packed

Loader = Callable[[Path], dict[str, torch.Tensor]]
COMPACT = {"format": "slimtorch.compact", "version": "1"}
PACKED = {"format": "slimtorch.sparse.packed", "version": "1"}


def _pruned_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    prune_(net, MagnitudeConfig(sparsity=0.9))
    return net.state_dict()


def _files(tmp_path: Path) -> tuple[dict[str, torch.Tensor], Path, Path]:
    sd = _pruned_state_dict()
    compact = save_compact(sd, tmp_path / "pruned.safetensors")
    packed = save_packed(sd, tmp_path / "sparse.safetensors")
    return sd, compact, packed


def _rewrite(path: Path, metadata: dict[str, str] | None) -> Path:
    save_file(load_file(path), path, metadata=metadata)
    return path


def _assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Bit-equal whatever the key order: the loaders give the file's order, not the dict's."""
    assert_bit_equal(dict(sorted(a.items())), dict(sorted(b.items())))


def _raises(load: Loader, path: Path, *parts: str) -> str:
    with pytest.raises(ValueError) as info:
        load(path)
    text = str(info.value)
    assert text.startswith(repr(str(path))), text
    for part in parts:
        assert re.search(part, text), (part, text)
    return text


def test_each_loader_names_the_loader_of_the_other_file(tmp_path: Path) -> None:
    _, compact, packed = _files(tmp_path)
    text = _raises(
        load_compact,
        packed,
        r"is a packed sparse file",
        r"load it with slimtorch\.sparse\.load_packed",
    )
    assert "truncated" not in text
    text = _raises(
        load_packed,
        compact,
        r"is a compact pruned file",
        r"load it with slimtorch\.prune\.load_compact",
    )
    assert "truncated" not in text


@pytest.mark.parametrize("which", ["compact", "packed"])
def test_a_newer_format_version_says_to_upgrade(tmp_path: Path, which: str) -> None:
    _, compact, packed = _files(tmp_path)
    path, load, meta = (
        (compact, load_compact, COMPACT) if which == "compact" else (packed, load_packed, PACKED)
    )
    _rewrite(path, {**meta, "version": "2"})
    _raises(
        load,
        path,
        re.escape(
            "was written by a newer slimtorch (format version 2, this one reads up to 1); "
            "upgrade slimtorch"
        ),
    )


@pytest.mark.parametrize("which", ["compact", "packed"])
def test_an_unknown_format_is_named(tmp_path: Path, which: str) -> None:
    _, compact, packed = _files(tmp_path)
    path, load = (compact, load_compact) if which == "compact" else (packed, load_packed)
    _rewrite(path, {"format": "something.else", "version": "9"})
    _raises(load, path, r"is in format 'something\.else'", r"not written by slimtorch")
    _rewrite(path, {"format": "slimtorch.future", "version": "1"})  # a later slimtorch's format
    _raises(load, path, r"is in format 'slimtorch\.future'", r"upgrade slimtorch")


@pytest.mark.parametrize("which", ["compact", "packed"])
def test_a_version_that_is_not_a_number_is_refused(tmp_path: Path, which: str) -> None:
    _, compact, packed = _files(tmp_path)
    path, load, meta = (
        (compact, load_compact, COMPACT) if which == "compact" else (packed, load_packed, PACKED)
    )
    _rewrite(path, {**meta, "version": "two"})
    _raises(load, path, r"has format version 'two', not a whole number")


@pytest.mark.parametrize("which", ["compact", "packed"])
def test_unmarked_and_current_files_still_load_exactly(tmp_path: Path, which: str) -> None:
    sd, compact, packed = _files(tmp_path)
    path, load, meta = (
        (compact, load_compact, COMPACT) if which == "compact" else (packed, load_packed, PACKED)
    )
    assert load_file(path) and _metadata(path) == meta  # what the writer puts there
    _assert_bit_equal(load(path), sd)
    unmarked: list[dict[str, str] | None] = [
        None,  # a file from before the marker
        {"note": "no format key"},
        {"format": "pt"},  # the plain torch tag other writers set
        {"format": meta["format"]},  # no version: version 1
        {**meta, "version": "0"},
    ]
    for metadata in unmarked:
        _assert_bit_equal(load(_rewrite(path, metadata)), sd)


@pytest.mark.parametrize("load", [load_compact, load_packed])
def test_damaged_files_keep_their_errors(tmp_path: Path, load: Loader) -> None:
    _, compact, _ = _files(tmp_path)
    data = compact.read_bytes()
    compact.write_bytes(data[: len(data) // 2])
    _raises(load, compact, r"is not a readable safetensors file")
    (tmp_path / "notes.txt").write_text("not a tensor file")
    _raises(load, tmp_path / "notes.txt", r"is not a readable safetensors file")
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.safetensors")


def _metadata(path: Path) -> dict[str, str] | None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta: dict[str, str] | None = f.metadata()
        return meta
