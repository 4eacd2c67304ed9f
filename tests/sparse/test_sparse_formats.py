"""BSR and 2:4 encodings round-trip bit-exactly; the smallest format has the fewest bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slimtorch.prune import MagnitudeConfig, NMConfig, nm_mask, prune_
from slimtorch.sparse import (
    FORMATS,
    decode,
    decode_bsr,
    decode_nm24,
    encode,
    encode_bsr,
    encode_nm24,
    format_nbytes,
    is_2to4,
    load_packed,
    pack_state_dict,
    save_packed,
    smallest_format,
    unpack_state_dict,
)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _sparse(shape: tuple[int, ...], density: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen)
    return w.masked_fill(torch.rand(shape, generator=gen) >= density, 0.0)  # +0.0, not -0.0


def _nm(w: torch.Tensor) -> torch.Tensor:
    return w.masked_fill(~nm_mask(w, 2, 4, dim=1), 0.0)


def _special_values(w: torch.Tensor) -> torch.Tensor:
    """Put -0.0 and NaN among the values: both are nonzero bit patterns and must survive."""
    flat = w.view(-1)
    nz = flat.nonzero().flatten()
    flat[nz[0]] = -0.0
    flat[nz[1]] = float("nan")
    return w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block", [(2, 2), (4, 8), (16, 16), None])
def test_bsr_round_trip_is_bit_exact(dtype: torch.dtype, block: tuple[int, int] | None) -> None:
    w = _special_values(_sparse((32, 64), 0.1)).to(dtype)
    w[:16, :16] = 0.0  # some empty blocks
    parts = encode_bsr(w, block=block)
    back = decode_bsr(parts)
    assert back.dtype == dtype and back.shape == w.shape
    assert torch.equal(_bits(back), _bits(w))
    bh, bw = parts["block"].tolist()
    kept = int(parts["values"].shape[0])
    blocks = w.reshape(32 // bh, bh, 64 // bw, bw).transpose(1, 2)
    assert kept == int((_bits(blocks.contiguous()) != 0).flatten(2).any(-1).sum())


def test_bsr_of_a_conv_weight_and_auto_block_choice() -> None:
    w = torch.zeros(32, 16, 3, 3)  # viewed as (32, 144)
    w[8:16, :4] = 1.5  # columns 0..35 of rows 8..15
    auto = encode_bsr(w)
    assert torch.equal(decode_bsr(auto), w)
    sizes = {}
    for b in ((2, 2), (4, 4), (8, 8), (16, 16)):
        parts = encode_bsr(w, block=b)
        sizes[b] = sum(t.numel() * t.element_size() for t in parts.values())
    assert tuple(auto["block"].tolist()) == min(sizes, key=lambda b: sizes[b])


def test_bsr_errors() -> None:
    with pytest.raises(ValueError, match="must divide the 6x6 view"):
        encode_bsr(torch.ones(6, 6), block=(4, 4))
    with pytest.raises(ValueError, match="pass block= explicitly or use csr"):
        encode_bsr(torch.ones(3, 5))
    parts = encode_bsr(torch.eye(8), block=(2, 2))
    parts["crow"] = parts["crow"][:-1]
    with pytest.raises(ValueError, match="truncated"):
        decode_bsr(parts)


@pytest.mark.parametrize("shape", [(16, 32), (8, 12, 3, 3), (4, 8, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nm24_round_trip_matches_prune_nm_masks(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    w = torch.randn(shape)
    w = _nm(w).to(dtype)
    w.view(-1)[w.view(-1).nonzero()[0]] = -0.0
    flat = w.movedim(1, -1).reshape(-1, 4)
    flat_view = w.movedim(1, -1)
    # some groups with fewer than 2 nonzeros
    flat_view[..., :4] = torch.tensor([0.0, 0.0, 0.0, 3.0], dtype=dtype)
    assert flat.shape[1] == 4 and is_2to4(w)
    parts = encode_nm24(w)
    groups = w.numel() // 4
    assert parts["values"].shape == (groups, 2)
    assert parts["index"].dtype == torch.uint8 and parts["index"].numel() == (groups + 1) // 2
    back = decode_nm24(parts)
    assert back.shape == w.shape and torch.equal(_bits(back), _bits(w))
    bytes_ = sum(t.numel() * t.element_size() for k, t in parts.items() if k != "shape")
    assert bytes_ == groups * 2 * w.element_size() + (groups + 1) // 2


def test_nm24_keeps_a_bfloat16_nan_payload() -> None:
    # torch's CPU gather/scatter on bfloat16 rewrote the NaN bit pattern 0x7FC0 as 0xFFFF
    w = torch.tensor([[0.0, 1.5, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]], dtype=torch.bfloat16)
    w.view(torch.int16)[0, 1] = 0x7FC0
    w.view(torch.int16)[1, 2] = 0x7F81  # a signalling-NaN pattern
    back = decode_nm24(encode_nm24(w))
    assert torch.equal(back.view(torch.int16), w.view(torch.int16))
    f8 = torch.tensor([[0.0, 1.5, 0.0, -2.0]]).to(torch.float8_e4m3fn)  # one-byte floats too
    assert torch.equal(decode_nm24(encode_nm24(f8)).view(torch.int8), f8.view(torch.int8))


def test_nm24_of_a_pruned_layer_and_errors() -> None:
    lin = torch.nn.Linear(24, 8)
    prune_(torch.nn.Sequential(lin), NMConfig(n=2, m=4))
    w = lin.weight.detach()
    assert torch.equal(decode_nm24(encode_nm24(w)), w)
    with pytest.raises(ValueError, match="not 2:4 sparse along dim 1"):
        encode_nm24(torch.ones(4, 8))
    with pytest.raises(ValueError, match="not 2:4"):
        encode_nm24(torch.zeros(4, 6))  # 6 is not divisible by 4
    parts = encode_nm24(w)
    parts["index"] = parts["index"][:-1]
    with pytest.raises(ValueError, match="index has"):
        decode_nm24(parts)


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "bits"])  # bits: bool only
def test_encode_decode_every_format(fmt: str) -> None:
    w = _nm(torch.randn(16, 32))
    w = _special_values(w)
    back = decode(encode(w, fmt), fmt)
    assert torch.equal(_bits(back), _bits(w))
    with pytest.raises(ValueError, match="fmt must be one of"):
        encode(w, "coo")


def test_format_sizes_and_smallest_format() -> None:
    unstructured = _sparse((64, 64), 0.05, seed=1)
    sizes = format_nbytes(unstructured)
    assert {"dense", "bitmask", "csr", "bsr"} <= set(sizes)
    assert ("nm24" in sizes) == is_2to4(unstructured)
    assert sizes["dense"] == 64 * 64 * 4
    nnz = int((unstructured != 0).sum())
    assert sizes["bitmask"] == 64 * 64 // 8 + nnz * 4 + 16
    assert sizes["csr"] == 65 * 2 + nnz * (2 + 4) + 16
    assert smallest_format(unstructured) == min(sizes, key=lambda f: sizes[f])
    assert smallest_format(_sparse((64, 64), 0.01, seed=2)) == "csr"  # fewer than 1 in 20
    blocky = torch.zeros(64, 64)
    blocky[:16, 32:48] = torch.randn(16, 16)
    assert smallest_format(blocky) == "bsr"
    assert smallest_format(torch.randn(16, 16)) == "dense"
    half = _nm(torch.randn(32, 64))
    nm = format_nbytes(half, ("bitmask", "nm24"))
    assert nm["bitmask"] == nm["nm24"]  # 2:4 never beats a bitmask on bytes; ties go first
    assert smallest_format(half, ("nm24", "bitmask")) == "nm24"
    with pytest.raises(ValueError, match="none of the formats"):
        smallest_format(torch.ones(4, 4), ("nm24",))


def test_packed_state_dict_round_trip(tmp_path: Path) -> None:
    sd = {
        "a.weight": _special_values(_sparse((64, 64), 0.05)),
        "a.bias": torch.randn(64),
        "b.weight": _nm(torch.randn(16, 32)),
        "mask": torch.rand(8, 8) > 0.5,
        "steps": torch.tensor(3),
    }
    packed = pack_state_dict(sd)
    fmt = smallest_format(sd["a.weight"])
    assert fmt != "dense" and any(k.startswith(f"a.weight::{fmt}::") for k in packed)
    assert "a.bias" in packed and "steps" in packed
    assert "mask::bits::bits" in packed  # a bool mask: 8 flags a byte
    back = unpack_state_dict(packed)
    assert list(back) == list(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype
        assert torch.equal(
            _bits(back[k]) if v.is_floating_point() else back[k],
            _bits(v) if v.is_floating_point() else v,
        )
    path = save_packed(sd, tmp_path / "w.safetensors")
    loaded = load_packed(path)
    assert torch.equal(_bits(loaded["a.weight"]), _bits(sd["a.weight"]))
    dense_bytes = sum(v.numel() * v.element_size() for v in sd.values())
    packed_bytes = sum(v.numel() * v.element_size() for v in packed.values())
    assert packed_bytes < dense_bytes
    with pytest.raises(ValueError, match="is missing part"):
        unpack_state_dict({k: v for k, v in packed.items() if not k.endswith("::values")})
    with pytest.raises(ValueError, match="marks packed parts"):
        pack_state_dict({"x::y": torch.ones(2)})


def test_damaged_nm24_and_bsr_parts_raise_instead_of_decoding_wrong_values() -> None:
    parts = encode_nm24(_nm(torch.randn(8, 16)))
    collide = parts["index"].clone()
    collide[0] = 0x00  # group 0 would put both its values at position 0
    with pytest.raises(ValueError, match=r"index of group 0 holds positions \[0, 0\], not two"):
        decode_nm24({**parts, "index": collide})
    with pytest.raises(
        ValueError, match=r"2:4 index must be a 1-d uint8 tensor, got torch\.float32"
    ):
        decode_nm24({**parts, "index": parts["index"].float()})
    w = torch.zeros(8, 8)
    w[0:2, 2:4], w[0:2, 6:8], w[4:6, 0:2] = 1.0, 2.0, 3.0
    bsr = encode_bsr(w, block=(2, 2))  # block row 0 holds block columns 1 and 3
    assert bsr["col"].tolist() == [1, 3, 0]
    for col in ([1, 1, 0], [3, 1, 0]):  # a repeated / unsorted column within one block row
        with pytest.raises(ValueError, match="BSR parts do not describe a tensor of shape"):
            decode_bsr({**bsr, "col": torch.tensor(col, dtype=torch.int16)})
    with pytest.raises(ValueError, match="bsr part 'shape' must be a 1-d integer tensor"):
        decode_bsr({**bsr, "shape": bsr["shape"].float()})


def test_unpack_names_the_damaged_entry_and_formats_must_be_a_list() -> None:
    sd = {"a.weight": _sparse((16, 16), 0.1)}
    packed = pack_state_dict(sd, ("dense", "bitmask"))
    key = "a.weight::bitmask::values"
    with pytest.raises(ValueError, match=r"packed entry 'a.weight' \(bitmask\): .* are corrupt: "):
        unpack_state_dict({**packed, key: packed[key][:-1]})
    with pytest.raises(ValueError, match="formats must be a list of format names, got the string"):
        pack_state_dict(sd, "csr")  # type: ignore[arg-type]


def test_masks_pack_to_a_bit_a_flag_and_empty_tensors_stay_dense(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 10))
    prune_(model, MagnitudeConfig(sparsity=0.9))
    sd = {**model.state_dict(), "empty": torch.zeros(0, 8), "none": torch.zeros(8, 0)}
    packed = pack_state_dict(sd)
    bits = [k for k in packed if k.startswith("0.weight_mask::")]
    assert bits == ["0.weight_mask::bits::bits", "0.weight_mask::bits::shape"]
    assert packed["0.weight_mask::bits::bits"].numel() == 256 * 256 // 8
    assert packed["empty"].shape == (0, 8) and packed["none"].shape == (8, 0)
    back = unpack_state_dict(packed)
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in sd.items())
    damaged = dict(packed)
    damaged["0.weight_mask::bits::bits"] = damaged["0.weight_mask::bits::bits"][:-1]
    with pytest.raises(ValueError, match=r"holds 8191 torch\.uint8 values, expected 8192"):
        unpack_state_dict(damaged)


def test_a_damaged_entry_names_the_file_and_its_own_format(tmp_path: Path) -> None:
    # the error named neither the file nor the packed entry's own parts: "compact entry
    # 'tensor' ... not written by compact_state_dict", a key and a writer the file never had
    from safetensors.torch import load_file, save_file

    w = torch.zeros(4, 8)
    w[0, :3] = 1.0
    path = tmp_path / "sparse.safetensors"
    save_packed({"fc.weight": w}, path, ("bitmask",))
    parts = load_file(path)
    key = next(k for k in parts if k.endswith("values"))
    parts[key] = parts[key][:-1]  # one value short of the mask
    save_file(parts, path)
    with pytest.raises(ValueError) as info:
        load_packed(path)
    text = str(info.value)
    assert text.startswith(f"{str(path)!r}: packed entry 'fc.weight' (bitmask): bitmask parts")
    assert "'tensor'" not in text and "compact_state_dict" not in text
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        load_packed(tmp_path)  # a folder: a bare "No such device (os error 19)" before
