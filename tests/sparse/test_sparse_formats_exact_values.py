"""Exact values of the sparse formats, packed state dicts, kernel layers and the sparsify report."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimtorch.sparse import (
    Candidate,
    SparseLinear,
    SparsifyReport,
    SparsifyRow,
    build_sparse_layer,
    decode,
    decode_bsr,
    decode_nm24,
    encode,
    format_nbytes,
    pack_state_dict,
    semi_structured_support,
    unpack_state_dict,
)


def _one_nonzero(cols: int) -> torch.Tensor:
    t = torch.zeros(1, cols)
    t[0, 0] = 1.0
    return t


def test_csr_column_index_is_int16_up_to_int16_max_columns() -> None:
    t = _one_nonzero(32767)  # the last column index is 32766, but the limit is the width 32767
    assert encode(t, "csr")["col"].dtype == torch.int16
    # shape 2 x int64 + crow 2 x int16 + col 1 x int16 + one float32 value
    assert format_nbytes(t, ("csr",)) == {"csr": 2 * 8 + 2 * 2 + 1 * 2 + 4}


def test_csr_column_index_is_int32_past_int16_max_columns() -> None:
    t = _one_nonzero(32768)
    assert encode(t, "csr")["col"].dtype == torch.int32
    assert format_nbytes(t, ("csr",)) == {"csr": 2 * 8 + 2 * 2 + 1 * 4 + 4}


def _bsr_parts(crow: list[int], col: list[int]) -> dict[str, torch.Tensor]:
    return {
        "crow": torch.tensor(crow),
        "col": torch.tensor(col),
        "values": torch.ones(1, 2, 2),
        "block": torch.tensor([2, 2]),
        "shape": torch.tensor([2, 2]),
    }


def test_decode_bsr_rejects_row_pointers_not_starting_at_zero() -> None:
    with pytest.raises(ValueError):
        decode_bsr(_bsr_parts([1, 1], [0]))


def test_decode_bsr_rejects_a_block_column_one_past_the_last() -> None:
    # a 2x2 tensor in 2x2 blocks has one block column: index 1 is out of range
    with pytest.raises(ValueError):
        decode_bsr(_bsr_parts([0, 1], [1]))


def test_decode_nm24_rejects_a_width_not_divisible_by_four() -> None:
    parts = {
        "values": torch.tensor([[1.0, 2.0]]),
        "index": torch.tensor([0b0100], dtype=torch.uint8),
        "shape": torch.tensor([2, 2]),
    }
    with pytest.raises(ValueError):
        decode_nm24(parts)


def test_decode_bits_rejects_a_negative_shape() -> None:
    parts = {"bits": torch.tensor([255], dtype=torch.uint8), "shape": torch.tensor([-2, -4])}
    with pytest.raises(ValueError, match="negative size"):
        decode(parts, "bits")


def test_bool_mask_stays_dense_when_bits_is_not_an_allowed_format() -> None:
    sd = {"m": torch.zeros(64, 64, dtype=torch.bool)}
    assert list(pack_state_dict(sd, formats=("dense", "csr"))) == ["m"]


def test_tiny_bool_mask_stays_dense_when_bits_would_be_larger() -> None:
    # 2 bools are 2 bytes dense; bit-packing adds a shape header, so dense is smaller
    assert list(pack_state_dict({"m": torch.tensor([True, False])})) == ["m"]


def test_unpack_rejects_a_packed_key_with_an_empty_part_name() -> None:
    packed = pack_state_dict({"w": torch.eye(4)}, formats=("dense", "csr"))
    packed["w::csr"] = torch.zeros(3)  # "<key>::<format>" with no part
    with pytest.raises(ValueError):
        unpack_state_dict(packed)


@pytest.mark.parametrize(("capability", "expected_none"), [((8, 0), True), ((7, 5), False)])
def test_semi_structured_support_needs_compute_capability_8(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], expected_none: bool
) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    reason = semi_structured_support("cuda:0")
    if expected_none:
        assert reason is None
    else:
        assert reason is not None and "7.5" in reason


def test_bsr_linear_uses_the_largest_block_that_divides_the_weight() -> None:
    w = torch.zeros(64, 64)
    w[:, :8] = 1.0  # nonzeros in the first 32-wide block column only
    layer = SparseLinear(w, None, "bsr")
    assert tuple(layer.weight.values().shape[-2:]) == (32, 32)


def test_grouped_conv_has_no_sparse_layer() -> None:
    with pytest.raises(ValueError):
        build_sparse_layer(nn.Conv2d(4, 4, 3, groups=2), "csr")


def _report() -> SparsifyReport:
    rows = [
        SparsifyRow(
            "a",
            "Linear",
            "dense",
            reason="slow",
            dense_s=2e-3,
            candidates=[Candidate("csr", "ok", 3e-3, 0.67)],
        ),
        SparsifyRow(
            "b",
            "Linear",
            "sparse",
            choice="bsr",
            dense_s=1e-3,
            candidates=[Candidate("csr", "ok", 8e-4, 1.25), Candidate("bsr", "ok", 5e-4, 2.0)],
        ),
    ]
    return SparsifyReport("cpu", 1, 1.05, ["csr", "bsr"], rows)


def test_report_after_time_adds_dense_rows_at_their_dense_time() -> None:
    # row a stays dense (2 ms), row b runs its chosen bsr kernel (0.5 ms)
    assert _report().to_dict()["totals"]["after_s"] == pytest.approx(2e-3 + 5e-4)


def test_report_speedup_is_the_chosen_formats_speedup() -> None:
    assert [r.speedup for r in _report().rows] == [None, 2.0]


def _one_row_table() -> str:
    row = SparsifyRow(
        "b",
        "Linear",
        "dense",
        reason="x",
        dense_s=1e-3,
        candidates=[
            Candidate("csr", "mismatch", None, None, 0.5, "err"),
            Candidate("bsr", "ok", 5e-4, 2.0),
        ],
    )
    return SparsifyReport("cpu", 1, 1.05, ["csr", "bsr"], [row]).to_table()


def test_report_table_shows_a_mismatched_candidate_by_its_status() -> None:
    assert "mismatch" in _one_row_table().splitlines()[-1].split()


def test_report_table_prints_times_in_microseconds() -> None:
    cells = _one_row_table().splitlines()[-1].split()
    assert "1000.0" in cells  # dense 1e-3 s
    assert "500.0" in cells  # bsr 5e-4 s
