"""Sparse storage formats, bit-exact: bitmask, CSR, block CSR (BSR) and 2:4, and the smallest pick.

Bitmask and CSR come from :mod:`slimtorch.prune.storage`; this module adds:

- **BSR** (block compressed sparse row; Saad 2003, "Iterative Methods for Sparse Linear
  Systems", sec. 3.4): the tensor, seen as ``(shape[0], -1)``, is cut into ``(bh, bw)`` blocks;
  every block holding a nonzero is kept whole, with one column index per block and row pointers
  per block row. It pays when zeros come in blocks (structured pruning); unstructured zeros rarely
  leave a whole block empty.
- **2:4** (``"nm24"``): every group of 4 consecutive weights along dim 1 (the input dimension of
  linear and conv weights, as :func:`slimtorch.prune.nm_mask` groups them) holds at most 2
  nonzeros; the 2 kept values are stored with their 2-bit positions, packed two groups a byte.
  That is ``0.5 * itemsize + 1/8`` bytes a weight (2.125 for float32, 1.125 for float16):
  exactly a bitmask's cost at 50% density, never less. Its worth is the layout: it is what
  semi-structured sparse kernels read, so ties go to the bitmask when choosing by size.

"Zero" means all bits zero (as in :mod:`slimtorch.prune.storage`), so ``-0.0`` and NaN are
values and every round trip is bit-exact. Each encoding is a dict of named tensors, ready for
safetensors; :func:`pack_state_dict` stores a whole state dict under ``"<key>::<format>::<part>"``
names, each tensor in the smallest allowed format.

Example:
    >>> w = torch.zeros(64, 64)
    >>> w[:16, 16:32] = torch.randn(16, 16)
    >>> parts = encode_bsr(w, block=(16, 16))
    >>> int(parts["values"].shape[0]), torch.equal(decode_bsr(parts), w)
    (1, True)
    >>> smallest_format(w)
    'bsr'
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import cached_property

import torch

from slimtorch.prune.storage import (
    expand_state_dict,
    nonzero_mask,
    pack_bits,
    unpack_bits,
)

FORMATS = ("dense", "bitmask", "csr", "bsr", "nm24", "bits")
BLOCKS = ((2, 2), (4, 4), (8, 8), (16, 16), (32, 32))
SEP = "::"
PARTS = {
    "dense": ("dense",),
    "bitmask": ("bitmask", "values", "shape"),
    "csr": ("crow", "col", "values", "shape"),
    "bsr": ("crow", "col", "values", "block", "shape"),
    "nm24": ("values", "index", "shape"),
    "bits": ("bits", "shape"),  # bool tensors (pruning masks): 8 flags a byte
}
"""The parts each format's encoding holds."""
Parts = dict[str, torch.Tensor]


def _nbytes(parts: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in parts.values())


def _index_dtype(limit: int) -> torch.dtype:
    if limit <= torch.iinfo(torch.int16).max:
        return torch.int16
    return torch.int32 if limit <= torch.iinfo(torch.int32).max else torch.int64


def _shape_tensor(t: torch.Tensor) -> torch.Tensor:
    return torch.tensor(list(t.shape), dtype=torch.int64)


def _as_2d(shape: Sequence[int]) -> tuple[int, int]:
    rows = int(shape[0]) if len(shape) >= 2 else 1
    return rows, (math.prod(int(s) for s in shape) // rows if rows else 0)


def _int_part(parts: Mapping[str, torch.Tensor], name: str, fmt: str) -> torch.Tensor:
    """An index part of ``fmt``'s encoding, which must be a 1-d integer tensor."""
    t = parts[name]
    if t.dim() != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(
            f"{fmt} part {name!r} must be a 1-d integer tensor, got {t.dtype} of shape "
            f"{tuple(t.shape)}; the data is damaged or was not written by encode"
        )
    return t


def _decoded_shape(parts: Mapping[str, torch.Tensor], fmt: str) -> list[int]:
    shape = [int(s) for s in _int_part(parts, "shape", fmt).tolist()]
    if any(s < 0 for s in shape):
        raise ValueError(f"{fmt} shape {shape} has a negative size; the data is damaged")
    return shape


def _check_tensor(t: object, *, copy: bool = True) -> torch.Tensor:
    """``t`` detached (with ``copy``, on the CPU and contiguous), if it has a sparse format."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 0 or t.numel() == 0:
        raise ValueError(f"a tensor of shape {tuple(t.shape)} has no sparse format; store it dense")
    return t.detach().cpu().contiguous() if copy else t.detach()


def _fitting_blocks(rows: int, cols: int) -> list[tuple[int, int]]:
    return [b for b in BLOCKS if rows % b[0] == 0 and cols % b[1] == 0]


def _bsr_nbytes(nz: torch.Tensor, itemsize: int) -> dict[tuple[int, int], int]:
    """Bytes of :func:`encode_bsr` at each block of :data:`BLOCKS` that divides the 2-D view of
    ``nz`` (a nonzero mask), from counts of nonzero blocks: nothing is encoded.

    Each block's map (which blocks hold a nonzero) is reduced from the coarsest map already made
    whose block divides it (4x4 from 2x2, not from the mask), so only the first pass reads it all.
    """
    rows, cols = _as_2d(nz.shape)
    maps = {(1, 1): nz.reshape(rows, cols)}
    out = {}
    for bh, bw in _fitting_blocks(rows, cols):
        (ph, pw), finer = max(
            ((p, m) for p, m in maps.items() if bh % p[0] == 0 and bw % p[1] == 0),
            key=lambda pm: pm[0][0] * pm[0][1],
        )
        m = finer.reshape(rows // bh, bh // ph, cols // bw, bw // pw).any(3).any(1)
        maps[(bh, bw)] = m
        k = int(m.count_nonzero())  # crow, col (one a block), values, block, shape
        crow, col = _index_dtype(k).itemsize, _index_dtype(cols // bw).itemsize
        out[(bh, bw)] = (rows // bh + 1) * crow + k * (col + bh * bw * itemsize) + 16 + 8 * nz.dim()
    return out


def encode_bsr(t: torch.Tensor, block: tuple[int, int] | None = None) -> Parts:
    """Block CSR of ``t`` seen as ``(shape[0], -1)``, keeping every block with a nonzero bit.

    Args:
        t: Any tensor with at least one dimension.
        block: ``(bh, bw)``; both must divide the 2-D view. ``None`` keeps the smallest
            encoding of :data:`BLOCKS`' (sized by counting nonzero blocks; only it is built).

    Returns:
        ``{"crow", "col", "values" (nblocks, bh, bw), "block", "shape"}``.

    Raises:
        ValueError: ``block`` does not divide the 2-D view (or none of :data:`BLOCKS` does).

    Example:
        >>> sorted(encode_bsr(torch.eye(4), block=(2, 2)))
        ['block', 'col', 'crow', 'shape', 'values']
    """
    t = _check_tensor(t)
    rows, cols = _as_2d(t.shape)
    if block is None:
        if not _fitting_blocks(rows, cols):
            raise ValueError(
                f"no block size of {BLOCKS} divides the {rows}x{cols} view of shape "
                f"{tuple(t.shape)}; pass block= explicitly or use csr"
            )
        sizes = _bsr_nbytes(nonzero_mask(t), t.element_size())
        return encode_bsr(t, min(sizes, key=sizes.__getitem__))  # the first of the smallest
    bh, bw = (int(b) for b in block)
    if bh < 1 or bw < 1 or rows % bh or cols % bw:
        raise ValueError(
            f"block {block} must divide the {rows}x{cols} view of shape {tuple(t.shape)}"
        )
    blocks = t.reshape(rows // bh, bh, cols // bw, bw).transpose(1, 2)  # (R, C, bh, bw)
    nz = nonzero_mask(blocks).reshape(rows // bh, cols // bw, -1).any(-1)  # (R, C)
    counts = nz.sum(1)
    crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    col = nz.nonzero()[:, 1]  # row-major block order
    return {
        "crow": crow.to(_index_dtype(int(crow[-1]))),
        "col": col.to(_index_dtype(cols // bw)),
        "values": blocks[nz].contiguous(),  # (nblocks, bh, bw)
        "block": torch.tensor([bh, bw], dtype=torch.int64),
        "shape": _shape_tensor(t),
    }


def decode_bsr(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`encode_bsr`, bit-exact.

    Raises:
        ValueError: the parts are inconsistent (truncated or foreign data).

    Example:
        >>> torch.equal(decode_bsr(encode_bsr(torch.eye(4), block=(2, 2))), torch.eye(4))
        True
    """
    shape = _decoded_shape(parts, "bsr")
    block = _int_part(parts, "block", "bsr")
    bh, bw = (int(b) for b in block.tolist()) if block.numel() == 2 else (0, 0)
    rows, cols = _as_2d(shape)
    crow, col = _int_part(parts, "crow", "bsr").long(), _int_part(parts, "col", "bsr").long()
    values = parts["values"]
    n_rows = rows // bh if bh else 0
    ok = bh > 0 and bw > 0 and rows % bh == 0 and cols % bw == 0 and crow.numel() == n_rows + 1
    ok = ok and values.shape[1:] == (bh, bw) and int(crow[-1]) == values.shape[0] == col.numel()
    ok = ok and int(crow[0]) == 0 and bool((crow.diff() >= 0).all())
    ok = ok and bool(((col >= 0) & (col < cols // bw)).all())
    if ok and col.numel() > 1:  # block columns strictly increase within each block row
        same_row = torch.ones(col.numel() - 1, dtype=torch.bool)
        same_row[crow[1:-1][(crow[1:-1] > 0) & (crow[1:-1] < col.numel())] - 1] = False
        ok = bool((col.diff()[same_row] > 0).all())
    if not ok:
        raise ValueError(
            f"BSR parts do not describe a tensor of shape {shape} with {bh}x{bw} blocks; "
            "the data is truncated or was not written by encode_bsr"
        )
    dense = values.new_zeros(n_rows, cols // bw, bh, bw)
    block_row = torch.repeat_interleave(torch.arange(n_rows), crow.diff())
    dense[block_row, col] = values
    return dense.transpose(1, 2).reshape(shape)


def _encode_bitmask(t: torch.Tensor) -> Parts:
    """The parts :func:`slimtorch.prune.storage.expand_state_dict` reads as a bitmask entry."""
    nz = nonzero_mask(t)
    return {"bitmask": pack_bits(nz), "values": t[nz].contiguous(), "shape": _shape_tensor(t)}


def _encode_csr(t: torch.Tensor) -> Parts:
    """The parts :func:`slimtorch.prune.storage.expand_state_dict` reads as a CSR entry."""
    rows, cols = _as_2d(t.shape)
    t2, nz = t.reshape(rows, cols), nonzero_mask(t).reshape(rows, cols)
    counts = nz.sum(1)
    crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return {
        "crow": crow.to(_index_dtype(int(crow[-1]))),
        "col": nz.nonzero()[:, 1].to(_index_dtype(cols)),  # row-major, the CSR order
        "values": t2[nz].contiguous(),
        "shape": _shape_tensor(t),
    }


def _groups(t: torch.Tensor) -> torch.Tensor:
    """``t`` with dim 1 last, in groups of 4: ``(G, 4)``."""
    return t.movedim(1, -1).reshape(-1, 4)


def _at_most_2_of_4(nz: torch.Tensor) -> bool:
    """Whether each group of 4 along dim 1 of the mask ``nz`` (dim 1 divides by 4) has <= 2 set."""
    shape = nz.shape
    groups = nz.view(torch.uint8).reshape(shape[0], shape[1] // 4, 4, math.prod(shape[2:]))
    return bool((groups.sum(2, dtype=torch.uint8) <= 2).all())


def is_2to4(t: torch.Tensor, *, bitwise: bool = True) -> bool:
    """Whether every group of 4 along dim 1 has at most 2 nonzeros (and dim 1 divides by 4).

    Args:
        t: The tensor.
        bitwise: Count ``-0.0`` as nonzero (what exact storage needs); ``False`` compares
            values (what a kernel needs).

    Example:
        >>> is_2to4(torch.tensor([[1.0, 0.0, 2.0, 0.0]])), is_2to4(torch.ones(1, 4))
        (True, False)
        >>> w = torch.tensor([[1.0, -0.0, 2.0, 0.0]])
        >>> is_2to4(w), is_2to4(w, bitwise=False)
        (False, True)
    """
    if t.dim() < 2 or t.shape[1] % 4:
        return False
    t = t.detach()
    return _at_most_2_of_4(nonzero_mask(t) if bitwise else t != 0)


def encode_nm24(t: torch.Tensor) -> Parts:
    """2:4 encoding: 2 values and their 2-bit positions per group of 4 along dim 1.

    Returns:
        ``{"values" (G, 2), "index" (uint8, ceil(G/2)), "shape"}``.

    Raises:
        ValueError: ``t`` is not 2:4 sparse along dim 1 (see :func:`is_2to4`).

    Example:
        >>> parts = encode_nm24(torch.tensor([[0.0, 5.0, 0.0, 7.0]]))
        >>> parts["values"].tolist(), parts["index"].tolist()
        ([[5.0, 7.0]], [13])
    """
    t = _check_tensor(t)
    if not is_2to4(t):
        raise ValueError(
            f"tensor of shape {tuple(t.shape)} is not 2:4 sparse along dim 1 (needs dim 1 "
            "divisible by 4 and at most 2 nonzeros in every group of 4); prune it with "
            "NMConfig(n=2, m=4) or use another format"
        )
    groups = _groups(t)  # (G, 4)
    nz = nonzero_mask(groups).to(torch.int8)
    # nonzeros first, then the lowest-index zeros; then ascending positions
    pos = torch.sort(nz, dim=1, descending=True, stable=True).indices[:, :2]
    pos = torch.sort(pos, dim=1).values  # (G, 2)
    codes = (pos[:, 0] | (pos[:, 1] << 2)).to(torch.uint8)  # 4 bits a group
    codes = torch.cat([codes, codes.new_zeros(codes.numel() % 2)]).view(-1, 2)
    return {
        "values": torch.gather(_as_bits(groups), 1, pos).view(groups.dtype).contiguous(),
        "index": (codes[:, 0] | (codes[:, 1] << 4)).contiguous(),
        "shape": _shape_tensor(t),
    }


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    """A float tensor's bits as integers of its size (gather and scatter then move bit patterns;
    on bfloat16 they rewrote NaN payloads); other tensors as they are."""
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.view(ints[t.element_size()]) if t.is_floating_point() else t


def decode_nm24(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`encode_nm24`, bit-exact.

    Example:
        >>> w = torch.tensor([[0.0, -0.0, 3.0, 0.0]])
        >>> torch.equal(decode_nm24(encode_nm24(w)).view(torch.int32), w.view(torch.int32))
        True
    """
    shape = _decoded_shape(parts, "nm24")
    values, index = parts["values"], parts["index"]
    if index.dtype != torch.uint8 or index.dim() != 1:
        raise ValueError(
            f"2:4 index must be a 1-d uint8 tensor, got {index.dtype} of shape "
            f"{tuple(index.shape)}; the data is damaged or was not written by encode_nm24"
        )
    groups = math.prod(shape) // 4
    if len(shape) < 2 or shape[1] % 4 or values.shape != (groups, 2):
        raise ValueError(
            f"2:4 parts (values {tuple(values.shape)}) do not describe a tensor of shape "
            f"{shape}; the data is truncated or was not written by encode_nm24"
        )
    if index.numel() != (groups + 1) // 2:
        raise ValueError(f"2:4 index has {index.numel()} bytes, expected {(groups + 1) // 2}")
    codes = torch.stack([index & 0xF, index >> 4], 1).reshape(-1)[:groups].long()
    pos = torch.stack([codes & 3, codes >> 2], 1)  # (G, 2)
    if not bool((pos[:, 0] < pos[:, 1]).all()):  # encode_nm24 writes 2 ascending positions
        bad = int((pos[:, 0] >= pos[:, 1]).nonzero()[0, 0])
        raise ValueError(
            f"2:4 index of group {bad} holds positions {pos[bad].tolist()}, not two distinct "
            "ascending positions; the data is damaged or was not written by encode_nm24"
        )
    out = values.new_zeros(groups, 4)
    _as_bits(out).scatter_(1, pos, _as_bits(values))  # bit patterns: bf16 NaN payloads too
    moved = [shape[0], *shape[2:], shape[1]]
    return out.view(moved).movedim(-1, 1).contiguous()


def encode(t: torch.Tensor, fmt: str) -> Parts:
    """Encode ``t`` in ``fmt`` (one of :data:`FORMATS`).

    Raises:
        ValueError: unknown format, or the format does not apply to ``t``.

    Example:
        >>> sorted(encode(torch.eye(4), "csr"))
        ['col', 'crow', 'shape', 'values']
    """
    if fmt == "dense" and isinstance(t, torch.Tensor) and t.dim():
        return {"dense": t.detach().cpu().contiguous()}  # empty tensors too
    t = _check_tensor(t)
    if fmt in ("bitmask", "csr"):
        if not t.is_floating_point():
            raise ValueError(f"{fmt} stores floating tensors; got {t.dtype}")
        return _encode_bitmask(t) if fmt == "bitmask" else _encode_csr(t)
    if fmt == "bsr":
        return encode_bsr(t)
    if fmt == "nm24":
        return encode_nm24(t)
    if fmt == "bits":
        if t.dtype != torch.bool:
            raise ValueError(f"bits stores bool tensors; got {t.dtype}")
        return {"bits": pack_bits(t), "shape": _shape_tensor(t)}
    raise ValueError(f"fmt must be one of {', '.join(FORMATS)}, got {fmt!r}")


def decode(parts: Mapping[str, torch.Tensor], fmt: str) -> torch.Tensor:
    """Inverse of :func:`encode`.

    Example:
        >>> w = torch.eye(4)
        >>> all(torch.equal(decode(encode(w, f), f), w) for f in ("dense", "csr", "bsr"))
        True
    """
    if fmt in PARTS and not set(PARTS[fmt]) <= set(parts):
        missing = sorted(set(PARTS[fmt]) - set(parts))
        raise ValueError(
            f"{fmt} parts {sorted(parts)} lack {missing}; the data is truncated or was not "
            "written by encode"
        )
    if fmt == "dense":
        return parts["dense"]
    if fmt in ("bitmask", "csr"):
        try:
            return expand_state_dict({f"tensor{SEP}{k}": v for k, v in parts.items()})["tensor"]
        except ValueError as exc:  # worded for a compact file's entry: say it of these parts
            detail = str(exc).partition(" is corrupt: ")[2] or str(exc)
            detail = detail.replace("compact_state_dict", "encode")
            raise ValueError(f"{fmt} parts are corrupt: {detail}") from None
    if fmt == "bsr":
        return decode_bsr(parts)
    if fmt == "nm24":
        return decode_nm24(parts)
    if fmt == "bits":
        shape, bits = _decoded_shape(parts, fmt), _int_part(parts, "bits", fmt)
        numel = math.prod(shape)
        if bits.dtype != torch.uint8 or bits.numel() != (numel + 7) // 8:
            raise ValueError(
                f"bits part holds {bits.numel()} {bits.dtype} values, expected "
                f"{(numel + 7) // 8} uint8 for shape {shape}; the data is truncated or damaged"
            )
        return unpack_bits(bits, numel).view(shape)
    raise ValueError(f"fmt must be one of {', '.join(FORMATS)}, got {fmt!r}")


class _Counts:
    """What the sizes of ``t``'s encodings depend on, each counted once and only when asked: its
    nonzero mask (one bool tensor), the mask's count and nonzero blocks; no encoding is made."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = _check_tensor(t, copy=False)  # encode's refusals: not a tensor, or empty
        self.header = 8 * self.t.dim()  # the int64 "shape" part

    @cached_property
    def mask(self) -> torch.Tensor:
        return nonzero_mask(self.t)

    @cached_property
    def nnz(self) -> int:
        return int(self.mask.count_nonzero())

    def nbytes(self, fmt: str) -> int | None:
        """``_nbytes(encode(t, fmt))``, or ``None`` where encode raises ValueError."""
        t, n, item = self.t, self.t.numel(), self.t.element_size()
        if fmt == "bits":
            return (n + 7) // 8 + self.header if t.dtype == torch.bool else None
        if fmt in ("bitmask", "csr"):
            if not t.is_floating_point():
                return None
            if fmt == "bitmask":  # packed mask, values, shape
                return (n + 7) // 8 + self.nnz * item + self.header
            rows, cols = _as_2d(t.shape)  # crow, col (one a value), values, shape
            crow, col = _index_dtype(self.nnz).itemsize, _index_dtype(cols).itemsize
            return (rows + 1) * crow + self.nnz * (col + item) + self.header
        if fmt == "bsr":
            if not _fitting_blocks(*_as_2d(t.shape)):
                return None
            return min(_bsr_nbytes(self.mask, item).values())
        if fmt == "nm24":  # values (G, 2), 4-bit codes two a byte, shape
            if t.dim() < 2 or t.shape[1] % 4 or not _at_most_2_of_4(self.mask):
                return None
            return n // 4 * 2 * item + (n // 4 + 1) // 2 + self.header
        return n * item  # dense


def format_nbytes(t: torch.Tensor, formats: Sequence[str] = FORMATS) -> dict[str, int]:
    """Bytes of ``t`` in each format of ``formats`` that applies to it: ``_nbytes(encode(t, f))``,
    counted from the nonzero mask (computed once) without encoding.

    Example:
        >>> format_nbytes(torch.zeros(4, 8), ("dense", "csr"))
        {'dense': 128, 'csr': 26}
    """
    if isinstance(formats, str):
        raise ValueError(f"formats must be a list of format names, got the string {formats!r}")
    out: dict[str, int] = {}
    counts = None
    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(f"formats must be among {', '.join(FORMATS)}, got {fmt!r}")
        if fmt == "dense" and isinstance(t, torch.Tensor) and t.dim():
            out[fmt] = t.numel() * t.element_size()  # empty tensors too, as encode
            continue
        try:
            counts = counts or _Counts(t)
        except ValueError:
            continue
        size = counts.nbytes(fmt)
        if size is not None:
            out[fmt] = size
    return out


def smallest_format(t: torch.Tensor, formats: Sequence[str] = FORMATS) -> str:
    """The format of ``formats`` that stores ``t`` in the fewest bytes (earlier wins ties).

    Example:
        >>> w = torch.zeros(64, 64)
        >>> w[:, ::4] = 1.0
        >>> smallest_format(w), smallest_format(torch.randn(8, 8))
        ('bitmask', 'dense')
        >>> w[:, 1::4] = 1.0  # now exactly 2:4: the same bytes as a bitmask
        >>> format_nbytes(w, ("bitmask", "nm24"))
        {'bitmask': 8720, 'nm24': 8720}
    """
    sizes = format_nbytes(t, formats)
    if not sizes:
        raise ValueError(f"none of the formats {list(formats)} applies; include 'dense'")
    return min(sizes, key=lambda f: (sizes[f], list(formats).index(f)))
