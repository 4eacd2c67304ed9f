"""Worker of the DDP test: run under ``torchrun --nproc_per_node=2`` (or in-process for 1 rank).

Each rank trains the same tiny model on its shard of every global batch and rank 0 saves the
final weights, history and evaluation to ``argv[1]``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

from slimtorch.train import (
    TrainConfig,
    Trainer,
    cleanup,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
    replica_mismatches,
)
from train_helpers import ListLoader, make_blobs, make_mlp

GLOBAL_BATCH = 8


def run(out_dir: Path) -> dict[str, Any]:
    """Train on this rank's shards; return weights, history and val metrics."""
    rank, world = get_rank(), get_world_size()
    x, y = make_blobs(48, seed=11)
    xv, yv = make_blobs(16, seed=12)
    torch.manual_seed(0)
    model = make_mlp()
    cfg = TrainConfig(
        epochs=2,
        optimizer="sgd",
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-3,
        schedule="cosine",
        warmup_epochs=0.5,
        amp="off",
        checkpoint_every_steps=4,
        progress=True,
        log_every_steps=3,
    )
    trainer = Trainer(model, cfg, out_dir=out_dir)
    train = ListLoader(x, y, GLOBAL_BATCH, rank=rank, world_size=world)
    val = ListLoader(xv, yv, GLOBAL_BATCH, shuffle=False, rank=rank, world_size=world)
    history = trainer.fit(train, val)
    result = {
        "weights": {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()},
        "history": history.to_dict(),
        "eval": trainer.evaluate(val),
        "world_size": world,
        "ddp_wrapped": trainer.is_distributed,
        "replica_mismatches": trainer.replica_mismatches,
    }
    # the check must see a replica drifting: rank 1 alone changes a weight, a mask entry and a
    # float buffer
    model.register_buffer("probe_mask", torch.ones(3, dtype=torch.bool))
    model.register_buffer("probe_stat", torch.zeros(2))
    first = next(iter(model.parameters()))
    if rank == 1:
        with torch.no_grad():
            first.view(-1)[0] += 1e-3
        model.probe_mask[1] = False
        model.probe_stat += 1.0
    result["drifted"] = replica_mismatches(model)
    return result


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    init_distributed(backend="gloo")  # CPU ranks, also on machines with a GPU
    try:
        result = run(out / "run")
        if is_main_process():
            torch.save(result, out / "result.pt")
    finally:
        cleanup()
    # Skip interpreter finalisation: gloo worker threads torn down there can abort the process
    # at random (a known PyTorch shutdown race, not a training error); all output is written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
