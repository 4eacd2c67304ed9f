"""Sparse training under DDP: 2 gloo ranks end with identical masks and weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from train_helpers import run_gloo_ranks

HERE = Path(__file__).parent


@pytest.mark.slow  # two fresh interpreters importing torch: about 6 s on 2 cores
def test_two_gloo_ranks_keep_identical_masks_and_weights(tmp_path: Path) -> None:
    run_gloo_ranks(str(HERE / "sparse_ddp_worker.py"), str(tmp_path))
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["world_size"] == r1["world_size"] == 2
    for kind in ("rigl", "set"):
        a, b = r0[kind], r1[kind]
        assert a["distributed"] and b["distributed"]
        # 2 epochs x 8 steps, updates every 3 steps until T_end = 12
        assert [u["step"] for u in a["updates"]] == [3, 6, 9]
        assert a["updates"] == b["updates"] and all(u["swapped"] > 0 for u in a["updates"])
        assert a["state"].keys() == b["state"].keys()
        masks = [k for k in a["state"] if k.endswith("weight_mask")]
        assert len(masks) == 3
        for key in a["state"]:
            assert torch.equal(a["state"][key], b["state"][key]), (kind, key)
        for name, row in a["summary"].items():
            assert row["active"] == row["target"] and row["nonzero_masked"] == 0, (kind, name)
