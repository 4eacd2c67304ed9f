"""Worker of the batch-norm recalibration DDP test: each rank averages its own batches, then the
ranks average their statistics; every rank saves its buffers to ``OUT/rank{r}.pt``."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from slimtorch.train import cleanup, get_rank, init_distributed, recalibrate_batchnorm_


def main() -> None:
    out = Path(sys.argv[1])
    init_distributed()
    try:
        rank = get_rank()
        torch.manual_seed(0)  # same weights on every rank
        net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
        g = torch.Generator().manual_seed(10 + rank)  # different data on each rank
        batches = [torch.randn(8, 4, generator=g) * (1 + rank) + rank for _ in range(3)]
        result = recalibrate_batchnorm_(net, batches)
        torch.save(
            {"state": net[1].state_dict(), "batches": batches, "result": result},
            out / f"rank{rank}.pt",
        )
    finally:
        cleanup()


if __name__ == "__main__":
    main()
