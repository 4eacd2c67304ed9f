"""Worker of the sparse DDP test: run under ``torchrun --nproc_per_node=2``.

Each rank trains the same MLP with RigL and then with SET on its shard of every global batch
and saves its final weights, masks and update history to ``argv[1]/rank<r>.pt``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtorch.sparse import make_sparse_callback
from slimtorch.train import (
    TrainConfig,
    Trainer,
    cleanup,
    get_rank,
    get_world_size,
    init_distributed,
)

GLOBAL_BATCH = 16


class ShardLoader:
    """Global batches of fixed data, reshuffled per epoch; this rank gets every world-th row."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, rank: int, world: int) -> None:
        self.x, self.y, self.rank, self.world, self.epoch = x, y, rank, world, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.x) // GLOBAL_BATCH

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.epoch))
        for b in range(len(self)):
            idx = order[b * GLOBAL_BATCH : (b + 1) * GLOBAL_BATCH][self.rank :: self.world]
            yield self.x[idx], self.y[idx]


def train(kind: str, rank: int, world: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(7)
    y = torch.randint(0, 4, (128,), generator=gen)
    x = torch.randn(128, 16, generator=gen) + nn.functional.one_hot(y, 16).float() * 3
    torch.manual_seed(rank)  # different on purpose: DDP must broadcast rank 0's weights
    model = nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)
    )
    cb = make_sparse_callback(kind, 0.8, delta_t=3)
    cfg = TrainConfig(
        epochs=2, lr=0.05, momentum=0.9, schedule="constant", amp="off", progress=False
    )
    trainer = Trainer(model, cfg, callbacks=[cb])
    trainer.fit(ShardLoader(x, y, rank, world))
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "updates": cb.updates,
        "summary": cb.summary(model),
        "distributed": trainer.is_distributed,
    }


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    init_distributed(backend="gloo")
    try:
        rank, world = get_rank(), get_world_size()
        result = {kind: train(kind, rank, world) for kind in ("rigl", "set")}
        result["world_size"] = world
        out.mkdir(parents=True, exist_ok=True)
        torch.save(result, out / f"rank{rank}.pt")
    finally:
        cleanup()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter finalisation (gloo shutdown race); output is written


if __name__ == "__main__":
    main()
