"""Compact storage: bitmask and CSR round trips are bit-exact and a 90%-sparse layer is >= 5x
smaller on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from slimtorch.prune import (
    MagnitudeConfig,
    compact_state_dict,
    expand_state_dict,
    load_compact,
    nonzero_mask,
    pack_bits,
    prune_,
    save_compact,
    unpack_bits,
)


def _assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        if a[key].is_floating_point():
            ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a[key].element_size()]
            assert torch.equal(a[key].view(ints), b[key].view(ints)), key
        else:
            assert torch.equal(a[key], b[key]), key


def _pruned_state_dict() -> dict[str, torch.Tensor]:
    net = nn.Sequential(nn.Conv2d(4, 16, 3), nn.BatchNorm2d(16), nn.Flatten(), nn.Linear(64, 300))
    prune_(net, MagnitudeConfig(sparsity=0.9))
    return net.state_dict()


@pytest.mark.parametrize("fmt", ["auto", "bitmask", "csr"])
def test_round_trip_is_bit_exact(fmt: str) -> None:
    sd = dict(_pruned_state_dict())
    odd = torch.zeros(7, 5, dtype=torch.float64)
    odd[0, 1], odd[3, 4], odd[6, 0] = -0.0, float("nan"), 1e-300
    sd["odd"] = odd
    sd["half"] = torch.where(torch.rand(40, 40) < 0.95, 0.0, torch.randn(40, 40)).half()
    sd["bf16"] = sd["half"].to(torch.bfloat16)
    sd["vector"] = torch.tensor([0.0, 0.0, 3.5, 0.0] * 50)
    sd["scalar"] = torch.tensor(2.0)
    compact = compact_state_dict(sd, format=fmt)
    assert any("::" in k for k in compact)
    _assert_bit_equal(expand_state_dict(compact), sd)


def test_format_choice_and_encodings() -> None:
    sd = _pruned_state_dict()
    bitmask = compact_state_dict(sd, format="bitmask")
    csr = compact_state_dict(sd, format="csr")
    assert "3.weight::bitmask" in bitmask and "3.weight::crow" in csr
    assert csr["3.weight::col"].dtype == torch.int16  # 64 columns fit in 16 bits
    assert "3.weight_mask::bits" in bitmask  # masks are bit-packed
    assert "1.running_var" in bitmask and "1.num_batches_tracked" in bitmask  # dense stays
    auto = compact_state_dict(sd)
    size = {
        k: sum(v.numel() * v.element_size() for v in d.values())
        for k, d in {"auto": auto, "bitmask": bitmask, "csr": csr}.items()
    }
    assert size["auto"] <= min(size["bitmask"], size["csr"])


def test_ninety_percent_sparse_layer_file_is_five_times_smaller(tmp_path: Path) -> None:
    layer = nn.Linear(512, 512)
    prune_(nn.Sequential(layer), MagnitudeConfig(sparsity=0.9))
    sd = {"weight": layer.weight.detach()}
    dense = tmp_path / "dense.safetensors"
    save_file({"weight": sd["weight"].contiguous()}, str(dense))
    for fmt in ("bitmask", "csr"):
        path = save_compact(sd, tmp_path / f"{fmt}.safetensors", format=fmt)
        ratio = dense.stat().st_size / path.stat().st_size
        assert ratio >= 5.0, (fmt, ratio)
        _assert_bit_equal(load_compact(path), sd)


def test_pack_bits_and_nonzero_mask() -> None:
    flags = torch.rand(1001) < 0.3
    packed = pack_bits(flags)
    assert packed.dtype == torch.uint8 and packed.numel() == 126
    assert torch.equal(unpack_bits(packed, 1001), flags)
    assert nonzero_mask(torch.tensor([0.0, -0.0, float("nan")])).tolist() == [False, True, True]


def test_bad_input_errors() -> None:
    with pytest.raises(ValueError, match="format must be one of"):
        compact_state_dict({}, format="coo")
    with pytest.raises(ValueError, match="contains '::'"):
        compact_state_dict({"a::b": torch.zeros(2)})
    compact = compact_state_dict({"w": torch.zeros(100, 100)}, format="bitmask")
    del compact["w::values"]
    with pytest.raises(ValueError, match="compact entry 'w' has parts"):
        expand_state_dict(compact)


def _corrupt(compact: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> dict:
    return {**compact, key: value}


@pytest.mark.parametrize(
    ("fmt", "part", "change", "match"),
    [
        ("bitmask", "values", lambda v: v[:-3], "bitmask marks 410 nonzeros but 407 values"),
        ("bitmask", "bitmask", lambda v: v[:-2], "bitmask holds 510 torch.uint8 values"),
        ("bitmask", "values", lambda v: v.to(torch.int32), "values must be a 1-d floating"),
        ("bitmask", "shape", lambda v: v.float(), "shape must be a 1-d integer tensor"),
        ("bitmask", "shape", lambda v: -v, r"shape \[-64, -64\] has a negative size"),
        ("csr", "col", lambda v: v.index_fill(0, torch.tensor([0]), 1000), "0 <= col_indices"),
        ("csr", "col", lambda v: v.float(), "col must be a 1-d integer tensor"),
        ("csr", "crow", lambda v: v[:-5], "number of rows"),
        ("csr", "values", lambda v: v[:-3], "CSR indices are invalid"),
    ],
)
def test_corrupt_entries_raise_value_error_naming_the_entry(
    fmt: str, part: str, change, match: str
) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    prune_(net, MagnitudeConfig(sparsity=0.9))  # 410 of 4096 weights stay
    compact = compact_state_dict(net.state_dict(), format=fmt)
    key = f"0.weight::{part}"
    with pytest.raises(
        ValueError, match=rf"compact entry '0.weight' \({fmt}\) is corrupt: .*{match}"
    ):
        expand_state_dict(_corrupt(compact, key, change(compact[key])))
    bits = compact["0.weight_mask::bits"]
    with pytest.raises(ValueError, match=r"'0.weight_mask' \(bits\) is corrupt: bits holds 511"):
        expand_state_dict(_corrupt(compact, "0.weight_mask::bits", bits[:-1]))


def test_truncated_or_foreign_file_names_the_path(tmp_path: Path) -> None:
    path = save_compact({"w": torch.zeros(64, 64)}, tmp_path / "w.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"w.safetensors' is not a readable safetensors file"):
        load_compact(path)
    (tmp_path / "notes.txt").write_text("not a tensor file")
    with pytest.raises(ValueError, match=r"notes.txt' is not a readable safetensors file"):
        load_compact(tmp_path / "notes.txt")


def test_compact_size_of_tied_weights_left_dense(tmp_path: Path) -> None:
    # save_compact copies the tensors it writes; the size function did not, and failed on two
    # tied weights left dense ("Some tensors share memory"), which compress's report calls
    from slimtorch.prune import compact_file_bytes

    torch.manual_seed(0)
    a, b = nn.Linear(16, 16), nn.Linear(16, 16)
    b.weight = a.weight
    net = nn.Sequential(a, nn.ReLU(), b, nn.ReLU(), nn.Linear(16, 4))
    prune_(net, MagnitudeConfig(sparsity=0.9), exclude=["0", "2"])
    sd = {k: v.detach() for k, v in net.state_dict().items()}
    path = save_compact(sd, tmp_path / "tied.safetensors")
    assert compact_file_bytes(sd) == path.stat().st_size


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1001])
def test_pack_bits_matches_numpys_little_endian_packing(n: int) -> None:
    import numpy as np

    from slimtorch.prune.storage import pack_bits, unpack_bits

    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8
    assert np.array_equal(packed.numpy(), np.packbits(mask.numpy(), bitorder="little"))
    assert torch.equal(unpack_bits(packed, n), mask)
