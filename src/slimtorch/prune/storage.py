"""Compact storage of pruned state dicts: bitmask + packed values, or CSR, in safetensors.

A dense float32 layer at 90% sparsity costs 4 bytes a weight; as a bitmask (1 bit a weight)
plus its nonzero values it costs 0.1 * 4 + 1/8 = 0.525 bytes (7.6x smaller); as CSR (Saad 2003,
"Iterative Methods for Sparse Linear Systems", sec. 3.4) with 16-bit column indices
0.1 * (4 + 2) = 0.6 bytes plus the row pointers. Bool tensors (pruning masks) are packed 8 to a
byte. Every tensor keeps the cheapest of dense and the allowed compact formats, and the round
trip is bit-exact: "zero" means all bits zero, so ``-0.0`` and NaN are stored as values.

Compact entries are stored under ``"<key>::<part>"`` names:

- bitmask: ``::bitmask`` (uint8, packed), ``::values`` (the nonzeros, flat), ``::shape``
- CSR: ``::crow``, ``::col``, ``::values``, ``::shape`` (the tensor seen as
  ``(shape[0], -1)``; 1-D tensors as one row)
- packed bool: ``::bits``, ``::shape``

Example:
    >>> w = torch.zeros(64, 64)
    >>> w[::8, ::4] = 1.0
    >>> compact = compact_state_dict({"fc.weight": w}, format="bitmask")
    >>> sorted(compact)
    ['fc.weight::bitmask', 'fc.weight::shape', 'fc.weight::values']
    >>> torch.equal(expand_state_dict(compact)["fc.weight"], w)
    True
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from slimtorch.core.io import atomic_write

logger = logging.getLogger(__name__)

SEP = "::"
FORMATS = ("auto", "bitmask", "csr")
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_PARTS = {
    "bitmask": ("bitmask", "values", "shape"),
    "csr": ("crow", "col", "values", "shape"),
    "bits": ("bits", "shape"),
}


def nonzero_mask(t: torch.Tensor) -> torch.Tensor:
    """``True`` where ``t`` has any bit set (so ``-0.0`` and NaN count as nonzero).

    Example:
        >>> nonzero_mask(torch.tensor([0.0, -0.0, 1.0])).tolist()
        [False, True, True]
    """
    if t.is_floating_point() or t.is_complex():
        flat = t.reshape(-1).contiguous().view(_INT_VIEW[t.element_size()])
        return (flat != 0).view(t.shape)
    return t != 0


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a ``bool`` tensor into ``uint8``, 8 flags a byte, least significant bit first.

    Example:
        >>> pack_bits(torch.tensor([True, False, True])).tolist()
        [5]
    """
    if mask.device.type == "cpu":  # numpy's packing: 0.03 s for 103M flags, 9x the loop below
        flags = mask.detach().flatten().to(torch.bool).numpy()
        return torch.from_numpy(np.packbits(flags, bitorder="little"))
    flat = mask.flatten().to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)]).view(-1, 8)
    packed = flat[:, 0].clone()  # uint8 shifts and ors: no int32 copies of the flags
    for bit in range(1, 8):
        packed |= flat[:, bit] << bit
    return packed  # (ceil(N/8),)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` flags, flat.

    Example:
        >>> unpack_bits(torch.tensor([5], dtype=torch.uint8), 3).tolist()
        [True, False, True]
    """
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = (packed.to(torch.uint8).unsqueeze(1) >> shifts) & 1  # (B, 8), no int32 copies
    return bits.flatten()[:numel].bool()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _index_dtype(limit: int) -> torch.dtype:
    if limit <= torch.iinfo(torch.int16).max:
        return torch.int16
    return torch.int32 if limit <= torch.iinfo(torch.int32).max else torch.int64


def _encode_bitmask(t: torch.Tensor, nz: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"bitmask": pack_bits(nz), "values": t[nz].contiguous()}


def _encode_csr(t: torch.Tensor, nz: torch.Tensor) -> dict[str, torch.Tensor]:
    rows = t.shape[0] if t.dim() >= 2 else 1
    t2, nz2 = t.reshape(rows, -1), nz.reshape(rows, -1)  # (rows, cols)
    counts = nz2.sum(1)
    crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    col = nz2.nonzero()[:, 1]  # row-major, the CSR order
    return {
        "crow": crow.to(_index_dtype(int(crow[-1]))),
        "col": col.to(_index_dtype(nz2.shape[1])),
        "values": t2[nz2].contiguous(),
    }


def checked_items(
    state_dict: Mapping[str, torch.Tensor], what: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """``state_dict``'s items, refusing a key holding the part separator and a non-tensor."""
    for key, tensor in state_dict.items():
        if SEP in key:
            raise ValueError(f"state dict key {key!r} contains {SEP!r}, which marks {what} parts")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state dict value {key!r} is a {type(tensor).__name__}, not a tensor")
        yield key, tensor


def compact_state_dict(
    state_dict: Mapping[str, torch.Tensor], *, format: str = "auto"
) -> dict[str, torch.Tensor]:
    """Encode each floating tensor as the smallest of dense and the allowed compact format(s).

    Args:
        state_dict: Name -> tensor (e.g. ``model.state_dict()`` of a pruned model).
        format: ``"bitmask"``, ``"csr"`` or ``"auto"`` (whichever of the two is smaller).
            Bool tensors are always bit-packed; other integer tensors stay dense.

    Returns:
        A flat name -> tensor dict (CPU), ready for safetensors.

    Raises:
        ValueError: unknown ``format``, or a key already contains ``"::"``.
        TypeError: a value is not a tensor.

    Example:
        >>> w = torch.zeros(8, 64)
        >>> w[0, 3] = 2.0
        >>> sd = {"w": w, "b": torch.ones(2)}
        >>> sorted(compact_state_dict(sd, format="csr"))
        ['b', 'w::col', 'w::crow', 'w::shape', 'w::values']
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in checked_items(state_dict, "compact"):
        t = tensor.detach().cpu().contiguous()
        shape = torch.tensor(list(t.shape), dtype=torch.int64)
        candidates: list[dict[str, torch.Tensor]] = [{"": t}]
        if t.dtype == torch.bool and t.dim() and t.numel():
            candidates.append({"bits": pack_bits(t), "shape": shape})
        elif t.is_floating_point() and t.dim() and t.numel():  # an empty tensor stays dense
            nz = nonzero_mask(t)
            if format in ("auto", "bitmask"):
                candidates.append({**_encode_bitmask(t, nz), "shape": shape})
            if format in ("auto", "csr"):
                candidates.append({**_encode_csr(t, nz), "shape": shape})
        best = min(candidates, key=lambda parts: sum(_nbytes(v) for v in parts.values()))
        for part, value in best.items():
            out[f"{key}{SEP}{part}" if part else key] = value
    return out


class _Corrupt(ValueError):
    """A compact entry whose parts do not fit together (raised with the entry's key added)."""


def _integers(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.dim() != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise _Corrupt(
            f"{what} must be a 1-d integer tensor, got {t.dtype} of shape {tuple(t.shape)}"
        )
    return t


def _shape(parts: Mapping[str, torch.Tensor], key: str) -> list[int]:
    shape = [int(s) for s in _integers(parts[f"{key}{SEP}shape"], "shape").tolist()]
    if any(s < 0 for s in shape):
        raise _Corrupt(f"shape {shape} has a negative size")
    return shape


def _packed_flags(packed: torch.Tensor, numel: int, what: str) -> torch.Tensor:
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != -(-numel // 8):
        raise _Corrupt(
            f"{what} holds {packed.numel()} {packed.dtype} values, expected {-(-numel // 8)} "
            f"uint8 bytes for {numel} flags"
        )
    return unpack_bits(packed, numel)


def _decode(kind: str, get: Mapping[str, torch.Tensor], shape: list[int]) -> torch.Tensor:
    numel = math.prod(shape)
    if kind == "bits":
        return _packed_flags(get["bits"], numel, "bits").view(shape)
    values = get["values"]
    if not values.is_floating_point() or values.dim() != 1:
        raise _Corrupt(
            f"values must be a 1-d floating tensor, got {values.dtype} of shape "
            f"{tuple(values.shape)}"
        )
    if kind == "bitmask":
        nz = _packed_flags(get["bitmask"], numel, "bitmask")
        if int(nz.sum()) != values.numel():
            raise _Corrupt(f"bitmask marks {int(nz.sum())} nonzeros but {values.numel()} values")
        dense = values.new_zeros(numel)
        dense[nz] = values
        return dense.view(shape)
    crow, col = _integers(get["crow"], "crow"), _integers(get["col"], "col")
    try:
        return _decode_csr(crow, col, values, shape)
    except RuntimeError as exc:  # torch's CSR invariant checks
        raise _Corrupt(f"CSR indices are invalid ({exc})") from None


def _decode_csr(
    crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: list[int]
) -> torch.Tensor:
    rows = shape[0] if len(shape) >= 2 else 1
    cols = math.prod(shape) // rows if rows else 0
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        csr = torch.sparse_csr_tensor(  # validates the index structure of a file read back
            crow.long(), col.long(), values, size=(rows, cols), check_invariants=True
        )
    # densify by assignment, not csr.to_dense(): its adds would turn -0.0 into +0.0
    dense = values.new_zeros(rows, cols)
    row_idx = torch.repeat_interleave(torch.arange(rows), csr.crow_indices().diff())
    dense[row_idx, csr.col_indices()] = csr.values()
    return dense.reshape(shape)


def expand_state_dict(compact: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Decode what :func:`compact_state_dict` wrote back into dense tensors, bit-exactly.

    Raises:
        ValueError: a compact entry is missing a part or its parts do not fit together (wrong
            counts, indices out of range, non-integer indices, non-floating values): the file
            is truncated, damaged or foreign. The message names the entry.

    Example:
        >>> sd = {"w": torch.tensor([[0.0, -0.0], [3.0, 0.0]])}
        >>> out = expand_state_dict(compact_state_dict(sd, format="csr"))
        >>> out["w"].view(torch.int32).tolist() == sd["w"].view(torch.int32).tolist()
        True
    """
    groups: dict[str, set[str]] = {}
    out: dict[str, torch.Tensor] = {}
    order: dict[str, None] = {}
    for name, value in compact.items():
        key, sep, part = name.partition(SEP)
        order.setdefault(key)
        if sep:
            groups.setdefault(key, set()).add(part)
        else:
            out[key] = value
    for key, parts in groups.items():
        kind = next((k for k, need in _PARTS.items() if need[0] in parts), None)
        if kind is None or not set(_PARTS[kind]) <= parts:
            raise ValueError(
                f"compact entry {key!r} has parts {sorted(parts)}, not a complete bitmask, CSR "
                "or packed-bool entry; the file is truncated or was not written by "
                "compact_state_dict"
            )
        get = {p: compact[f"{key}{SEP}{p}"] for p in parts}
        try:
            out[key] = _decode(kind, get, _shape(compact, key))
        except _Corrupt as exc:
            raise ValueError(
                f"compact entry {key!r} ({kind}) is corrupt: {exc}; the file is damaged or was "
                "not written by compact_state_dict"
            ) from None
    return {k: out[k] for k in order}


COMPACT_FORMAT = "slimtorch.compact"
COMPACT_VERSION = 1
_COMPACT_METADATA = {"format": COMPACT_FORMAT, "version": str(COMPACT_VERSION)}
# The safetensors files slimtorch writes: the ``format`` each names in its metadata, what it is
# and the loader that reads it. ``"version"`` counts up when a file layout changes.
FILE_FORMATS = {
    COMPACT_FORMAT: ("a compact pruned file", "slimtorch.prune.load_compact"),
    "slimtorch.sparse.packed": ("a packed sparse file", "slimtorch.sparse.load_packed"),
}
# ``"format": "pt"`` is the torch tag other writers (transformers) put on a plain state dict:
# no slimtorch marker, read as a file from before the marker
_PLAIN_FORMATS = frozenset({"pt"})


def compact_file_bytes(state_dict: Mapping[str, torch.Tensor], *, format: str = "auto") -> int:
    """Size of the file :func:`save_compact` writes for ``state_dict``, header included
    (serialised in memory, not written).

    Example:
        >>> sd = {"w": torch.zeros(64, 64)}  # all zeros: almost nothing to store
        >>> compact_file_bytes(sd) < 64 * 64 * 4 // 20
        True
    """
    from safetensors.torch import save

    # copies, as save_compact writes them: tied weights left dense share memory, which
    # safetensors refuses
    compact = {k: v.clone() for k, v in compact_state_dict(state_dict, format=format).items()}
    return len(save(compact, metadata=_COMPACT_METADATA))


def save_compact(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    format: str = "auto",
) -> Path:
    """Write ``compact_state_dict(state_dict)`` to a safetensors file, atomically.

    Example:
        >>> save_compact(model.state_dict(), "out/pruned.safetensors")  # doctest: +SKIP
    """
    from safetensors.torch import save_file

    compact = {k: v.clone() for k, v in compact_state_dict(state_dict, format=format).items()}
    written = atomic_write(path, lambda p: save_file(compact, p, metadata=_COMPACT_METADATA))
    logger.info("saved %d tensors compactly to %s", len(state_dict), written)
    return written


def load_compact(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a file written by :func:`save_compact` as a dense state dict (CPU).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a complete safetensors file (truncated, not safetensors),
            is another format (a packed sparse file: the message names its loader) or from a
            newer slimtorch, or a compact entry in it is corrupt (see :func:`expand_state_dict`).

    Example:
        >>> model.load_state_dict(load_compact("out/pruned.safetensors"))  # doctest: +SKIP
    """
    tensors = read_safetensors(path, format=COMPACT_FORMAT, version=COMPACT_VERSION)
    try:
        return expand_state_dict(tensors)
    except ValueError as exc:
        raise ValueError(f"{os.fspath(path)!r}: {exc}") from None


def read_safetensors(
    path: str | os.PathLike[str], *, format: str | None = None, version: int = 1
) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (CPU); an unreadable file raises ``ValueError``.

    With ``format`` (a key of :data:`FILE_FORMATS`), the file's metadata must name that format
    at a version up to ``version``, or name none (a file from before the marker): a file of
    another format raises ``ValueError`` naming the loader it needs, one written by a newer
    slimtorch one saying to upgrade. The metadata is checked before any tensor is read.

    Example:
        >>> read_safetensors("out/pruned.safetensors")  # doctest: +SKIP
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            if format is not None:
                check_file_format(path, f.metadata() or {}, format, version)
            return {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError) as exc:  # a folder: "No such device (os error 19)"
        raise ValueError(
            f"{os.fspath(path)!r} is not a readable safetensors file ({exc}); it is truncated "
            "or not a safetensors file: write it again"
        ) from None


def check_file_format(
    path: str | os.PathLike[str], metadata: Mapping[str, str], format: str, version: int
) -> None:
    """Refuse a file whose safetensors ``metadata`` is not ``format`` up to ``version``.

    No ``"format"`` key (or the plain torch tag ``"pt"``) passes: such a file predates the
    marker or holds a plain state dict. No ``"version"`` key reads as version 1.

    Raises:
        ValueError: another slimtorch format (names its loader), an unknown format, a version
            newer than ``version`` or one that is not a whole number. The message names the file.

    Example:
        >>> meta = {"format": "slimtorch.sparse.packed", "version": "1"}
        >>> check_file_format("w.safetensors", meta, "slimtorch.compact", 1)
        Traceback (most recent call last):
        ...
        ValueError: 'w.safetensors' is a packed sparse file ...; load it with ...load_packed
    """
    found = metadata.get("format")
    if found is None or found in _PLAIN_FORMATS:
        return
    what, loader = FILE_FORMATS[format]
    name = repr(os.fspath(path))
    if found != format:
        if found in FILE_FORMATS:
            other, other_loader = FILE_FORMATS[found]
            raise ValueError(
                f"{name} is {other} (format {found!r}), not {what}; load it with {other_loader}"
            )
        hint = (
            "written by a newer slimtorch: upgrade slimtorch"
            if found.startswith("slimtorch.")
            else "not written by slimtorch: read it with the tool that wrote it"
        )
        raise ValueError(
            f"{name} is in format {found!r}, not {what} (format {format!r}), so {loader} "
            f"cannot read it; it was {hint}"
        )
    raw = metadata.get("version", "1")
    try:
        number = int(raw)
    except ValueError:
        raise ValueError(
            f"{name} has format version {raw!r}, not a whole number; the file is damaged or "
            f"was not written by slimtorch: write it again"
        ) from None
    if number > version:
        raise ValueError(
            f"{name} was written by a newer slimtorch (format version {number}, this one reads "
            f"up to {version}); upgrade slimtorch"
        )
