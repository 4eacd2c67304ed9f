"""format_nbytes counts each format's bytes without encoding: the same numbers as encoding."""

from __future__ import annotations

import math

import pytest
import torch

from slimtorch.sparse import formats as F
from slimtorch.sparse.formats import (
    BLOCKS,
    FORMATS,
    encode,
    encode_bsr,
    format_nbytes,
    is_2to4,
    smallest_format,
)

SHAPES = [
    (1,),
    (7,),
    (64,),
    (7, 13),
    (4, 8),
    (3, 4),
    (16, 16),
    (32, 64),
    (96, 160),
    (4, 8, 5),
    (3, 5, 3, 3),
    (16, 8, 3, 3),
    (8, 16, 1, 1),
    (32, 32, 3, 3),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.bool, torch.int8]
PATTERNS = ["zero", "dense", "random", "nm24", "nm24_sparser", "block", "special"]


def _encoded_nbytes(t: torch.Tensor, fmt: str) -> int:
    """What format_nbytes reported before: the bytes of the encoding, built in full."""
    if fmt != "bsr":
        return sum(x.numel() * x.element_size() for x in encode(t, fmt).values())
    sizes = []
    for block in BLOCKS:  # encode_bsr(t) keeps the smallest of these; built here one by one
        try:
            parts = encode_bsr(t, block=block)
        except ValueError:
            continue
        sizes.append(sum(x.numel() * x.element_size() for x in parts.values()))
    if not sizes:
        raise ValueError("no block fits")
    return min(sizes)


def _reference(t: torch.Tensor, formats: tuple[str, ...] = FORMATS) -> dict[str, int]:
    out = {}
    for fmt in formats:
        try:
            out[fmt] = _encoded_nbytes(t, fmt)
        except ValueError:
            continue
    return out


def _old_is_2to4(t: torch.Tensor, bitwise: bool = True) -> bool:
    if t.dim() < 2 or t.shape[1] % 4:
        return False
    groups = t.detach().movedim(1, -1).reshape(-1, 4)
    nz = F.nonzero_mask(groups) if bitwise else groups != 0
    return bool((nz.sum(1) <= 2).all())


def _keep_2_of_4(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A bool mask with exactly 2 of every 4 along dim 1 set (dim 1 divides by 4)."""
    moved = (shape[0], *shape[2:], shape[1])
    keep = torch.rand(math.prod(shape) // 4, 4, generator=gen).argsort(1)[:, :2]
    mask = torch.zeros(math.prod(shape) // 4, 4, dtype=torch.bool).scatter_(1, keep, True)
    return mask.view(moved).movedim(-1, 1)


def _block_mask(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor | None:
    rows = shape[0] if len(shape) >= 2 else 1
    cols = math.prod(shape) // rows
    fits = [b for b in BLOCKS if rows % b[0] == 0 and cols % b[1] == 0]
    if not fits:
        return None
    bh, bw = fits[int(torch.randint(len(fits), (1,), generator=gen))]
    blocks = torch.rand(rows // bh, cols // bw, generator=gen) < 0.3
    return blocks.repeat_interleave(bh, 0).repeat_interleave(bw, 1).reshape(shape)


def _tensor(shape: tuple[int, ...], dtype: torch.dtype, pattern: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=gen)
    values[values == 0] = 1.0
    keep = torch.rand(shape, generator=gen) < float(torch.rand((), generator=gen))
    if pattern == "zero":
        keep = torch.zeros(shape, dtype=torch.bool)
    elif pattern == "dense":
        keep = torch.ones(shape, dtype=torch.bool)
    elif pattern.startswith("nm24") and len(shape) >= 2 and shape[1] % 4 == 0:
        nm = _keep_2_of_4(shape, gen)
        keep = nm & keep if pattern == "nm24_sparser" else nm
    elif pattern == "block":
        blocks = _block_mask(shape, gen)
        keep = blocks if blocks is not None else keep
    t = values.masked_fill(~keep, 0.0).to(dtype) if dtype != torch.bool else keep.clone()
    if pattern == "special" and dtype.is_floating_point and keep.sum() >= 2:
        flat, nz = t.view(-1), keep.view(-1).nonzero().flatten()
        flat[nz[0]], flat[nz[1]] = -0.0, float("nan")  # nonzero bit patterns
        zeros = (~keep.view(-1)).nonzero().flatten()
        flat[zeros[::2]] = -0.0  # a nonzero bit pattern too
    return t


@pytest.mark.parametrize("chunk", range(6))
def test_format_nbytes_matches_encoding_random(chunk: int) -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(1000 + chunk)
    for case in range(60):
        shape = SHAPES[int(torch.randint(len(SHAPES), (1,), generator=gen))]
        dtype = DTYPES[int(torch.randint(len(DTYPES), (1,), generator=gen))]
        pattern = PATTERNS[int(torch.randint(len(PATTERNS), (1,), generator=gen))]
        t = _tensor(shape, dtype, pattern, seed=chunk * 1000 + case)
        got, want = format_nbytes(t), _reference(t)
        assert got == want and list(got) == list(want), (shape, dtype, pattern)
        assert is_2to4(t) == _old_is_2to4(t) and is_2to4(t, bitwise=False) == _old_is_2to4(t, False)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_format_nbytes_matches_encoding_each_case(
    shape: tuple[int, ...], pattern: str, dtype: torch.dtype
) -> None:
    t = _tensor(shape, dtype, pattern, seed=SHAPES.index(shape) * 10 + PATTERNS.index(pattern))
    sizes = format_nbytes(t)
    assert sizes == _reference(t)
    if pattern in ("nm24", "zero") and len(shape) >= 2 and shape[1] % 4 == 0:
        assert "nm24" in sizes
    if "bsr" in sizes:  # encode_bsr(t) keeps the first of the smallest blocks
        by_block = {}
        for block in BLOCKS:
            try:
                parts = encode_bsr(t, block=block)
            except ValueError:
                continue
            by_block[block] = sum(x.numel() * x.element_size() for x in parts.values())
        assert sizes["bsr"] == min(by_block.values())
        best = min(by_block, key=by_block.__getitem__)
        assert tuple(encode_bsr(t)["block"].tolist()) == best


@pytest.mark.parametrize(
    "shape, dtype",
    [
        ((40_000,), torch.float16),  # cols > int16: int32 col indices; many nonzeros: int32 crow
        ((2, 65_540), torch.float16),  # 2x2 blocks: 32770 block columns, int32 col
        ((256, 256), torch.float16),  # 16384 2x2 blocks of 65536 values
        ((4, 32_768), torch.bfloat16),  # cols at the int16 edge: 32768 needs int32
        ((4, 32_767), torch.float32),  # just under it: int16
    ],
)
@pytest.mark.parametrize("density", [0.0, 0.02, 0.6, 1.0])
def test_index_dtypes_cross_int16(
    shape: tuple[int, ...], dtype: torch.dtype, density: float
) -> None:
    gen = torch.Generator().manual_seed(7)
    t = torch.randn(shape, generator=gen).masked_fill(
        torch.rand(shape, generator=gen) >= density, 0
    )
    t = t.to(dtype)
    assert format_nbytes(t) == _reference(t)


def test_edge_inputs_and_errors() -> None:
    cases = [
        torch.tensor(3.0),  # a scalar: dense refused too
        torch.zeros(0),
        torch.zeros(0, 4),
        torch.zeros(4, 0, 3),
        torch.randn(8, 12).t(),  # not contiguous
        torch.randn(8, 16, requires_grad=True),
        torch.randn(16, 8, 3, 3).to(memory_format=torch.channels_last),
        (torch.rand(8, 8) > 0.5).t(),
        torch.randint(-2, 3, (4, 8), dtype=torch.int64),
        torch.zeros(6, 8, dtype=torch.bool),
    ]
    for t in cases:
        for formats in (FORMATS, FORMATS[::-1], ("bsr", "csr"), ("nm24",), ("bits", "dense"), ()):
            got, want = format_nbytes(t, formats), _reference(t, formats)
            assert got == want and list(got) == list(want), (t.shape, t.dtype, formats)
    with pytest.raises(TypeError, match="expected a torch"):
        format_nbytes([1.0, 2.0], ("dense",))  # type: ignore[arg-type]
    assert format_nbytes([1.0, 2.0], ()) == {}  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="formats must be among"):
        format_nbytes(torch.ones(4), ("dense", "coo"))
    with pytest.raises(ValueError, match="got the string"):
        format_nbytes(torch.ones(4), "csr")
    with pytest.raises(ValueError, match="none of the formats"):
        smallest_format(torch.tensor(1.0), ("csr",))


def test_format_nbytes_builds_no_encoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("format_nbytes encoded a tensor")

    w = torch.zeros(64, 64)
    w[:16, 16:32] = 1.0  # one 16x16 block: 5 * 2 + 2 + 1024 + 16 + 16 bytes of BSR
    want = {"dense": 16384, "bitmask": 512 + 1024 + 16, "csr": 130 + 256 * 6 + 16, "bsr": 1068}
    assert _reference(w) == want
    for name in ("encode", "encode_bsr", "encode_nm24", "_encode_bitmask", "_encode_csr"):
        monkeypatch.setattr(F, name, refuse)
    monkeypatch.setattr(F, "pack_bits", refuse)
    assert format_nbytes(w) == want
    assert smallest_format(w) == "bsr"
    assert format_nbytes(torch.rand(9, 9) > 0.5, ("dense", "bits")) == {"dense": 81, "bits": 27}
