"""Sparse training under DDP: 2 gloo ranks end with identical masks and weights."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow  # two fresh interpreters importing torch: about 6 s on 2 cores
def test_two_gloo_ranks_keep_identical_masks_and_weights(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(HERE / "sparse_ddp_worker.py"),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
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
