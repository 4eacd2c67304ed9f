"""Worker of the compress-under-DDP test: ``torchrun --nproc_per_node=2 compress_ddp_worker.py
BASE OUT METHOD``. Every rank runs the same compress_run; each saves its final weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from slimtorch.pipeline import compress_run
from slimtorch.train import TrainConfig, cleanup, get_rank, init_distributed


def main() -> None:
    base, out, method = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    options = json.loads(sys.argv[4])
    init_distributed()
    try:
        res = compress_run(
            in_dir=base,
            out_dir=out,
            method=method,
            method_options=options,
            finetune=TrainConfig(epochs=2, lr=0.02, progress=False, amp="off"),
            batch_size=64,
            profile_batch=4,
            profiles=(),
            threads=1,
        )
        state = {k: v.detach().cpu() for k, v in res.model.state_dict().items()}
        out.mkdir(parents=True, exist_ok=True)  # (rank 0 writes the run; it may not be there)
        torch.save(state, out / f"rank{get_rank()}.pt")
        transforms = getattr(res.model, "slimtorch_arch", {}).get("transforms", [])
        (out / f"rank{get_rank()}.json").write_text(json.dumps(transforms, default=str))
    finally:
        cleanup()


if __name__ == "__main__":
    main()
