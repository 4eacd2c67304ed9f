"""Data-parallel scaling and accuracy parity of ``slimtorch train``, one command for a whole host.

Two measurements, each a set of ``slimtorch train`` runs launched one after the other (never
side by side, so that they do not share the GPUs):

- **Throughput** (``--per-rank-batches``): for each world size W in ``--world-sizes`` and each
  per-rank batch b, train ``--epochs`` epochs with global batch ``W * b`` and read the images/s
  of every epoch after the first (warm-up) from ``history.json``. World size 1 is a plain
  process (the real one-GPU baseline); with ``--ddp-one`` it is also run as a forced group of
  one (``SLIMTORCH_DIST_FORCE=1``: DDP over NCCL on one GPU, what the wrapper itself costs).
  Scaling efficiency of W ranks = throughput(W) / (W * throughput(1)) at the same per-rank
  batch; the speed-up is throughput(W) / throughput(1).
- **Accuracy parity** (``--parity-epochs``): one rank and W ranks on the same *global* batch
  (``--parity-batch``), the same schedule and seeds; reports the test top-1 of each and whether
  the ranks ended with identical parameters and masks (``ranks_consistent`` in the model's
  ``metrics.json``, checked by the Trainer after every data-parallel run).

The JSON file is rewritten (atomically) after every run, so a run that fails later leaves the
results of the earlier ones.

World sizes above 1 run under ``torch.distributed.run`` with one process per GPU (NCCL), or
with ``--device cpu`` one process per CPU share (gloo). Writes one JSON file and prints a table.

Example (a host with 2 GPUs; about 10 minutes for resnet56 on Fashion-MNIST):
    python scripts/bench_ddp.py --model resnet56 --dataset fashion-mnist --device cuda \\
        --world-sizes 1,2 --per-rank-batches 256,1024 --epochs 3 --threads 8 \\
        --parity-epochs 30 --parity-batch 256 --seeds 0,1 --out docs/results/ddp-2gpu.json
    python scripts/bench_ddp.py --model mlp --dataset digits --device cpu --world-sizes 1,2 \\
        --per-rank-batches 32 --epochs 2 --threads 1 --out /tmp/ddp-cpu.json   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _bench_common import positive_int

from slimtorch.core.devices import run_info
from slimtorch.core.io import atomic_write_json


def _ints(text: str, minimum: int = 1) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v < minimum for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= {minimum}, got {text!r}")
    return values


def _add_speedups(result: dict[str, Any]) -> None:
    """Speed-up and efficiency of each throughput row against world size 1 (no DDP) at the same
    per-rank batch, where that baseline has run."""
    base = {
        r["per_rank_batch"]: r["images_per_s_median"]
        for r in result["throughput"]
        if r["world_size"] == 1 and not r["ddp"]
    }
    for r in result["throughput"]:
        one = base.get(r["per_rank_batch"])
        if one and r["images_per_s_median"]:
            r["speedup"] = r["images_per_s_median"] / one
            r["efficiency"] = r["speedup"] / r["world_size"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(
    world: int, train_args: list[str], *, force_ddp: bool = False, timeout: float | None = None
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``slimtorch train`` with ``world`` processes; returns the process and its seconds."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if world == 1 and not force_ddp:
        cmd = [sys.executable, "-m", "slimtorch.cli", "train", *train_args]
    else:
        if force_ddp:
            env["SLIMTORCH_DIST_FORCE"] = "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
               f"--nproc_per_node={world}", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", "-m", "slimtorch.cli", "train",
               *train_args]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(
            f"training with {world} process(es) failed (exit {proc.returncode}):\n"
            f"{' '.join(cmd)}\n{proc.stderr[-3000:]}"
        )
    return proc, seconds


def read_run(out: Path) -> dict[str, Any]:
    """Images/s per epoch, test accuracy and the replica check of one finished run."""
    history = json.loads((out / "history.json").read_text(encoding="utf-8"))
    metrics = json.loads((out / "model" / "metrics.json").read_text(encoding="utf-8"))
    per_epoch = [v for v in history["images_per_s"] if v is not None]
    steady = per_epoch[1:] or per_epoch  # the first epoch includes warm-up
    return {
        "images_per_s": per_epoch,
        "images_per_s_median": statistics.median(steady) if steady else None,
        "test_accuracy": metrics.get("test_accuracy"),
        "ranks_consistent": metrics.get("ranks_consistent"),
    }


def _train_args(
    args: argparse.Namespace, out: Path, batch: int, epochs: int, seed: int
) -> list[str]:
    extra = ["--lr", str(args.lr)] if args.lr is not None else []
    return ["--model", args.model, "--dataset", args.dataset, "--epochs", str(epochs),
            "--batch-size", str(batch), "--device", args.device, "--threads", str(args.threads),
            "--seed", str(seed), "--no-progress", "--no-download", "--overwrite", "--out", str(out),
            *(["--data-root", args.data_root] if args.data_root else []), *extra]  # fmt: skip


def check_devices(device: str, worlds: list[int]) -> None:
    """Refuse world sizes the host cannot give one GPU per rank."""
    if device != "cuda":
        return
    have = torch.cuda.device_count()
    if have == 0:
        raise SystemExit("--device cuda but no CUDA GPU is visible")
    if max(worlds) > have:
        raise SystemExit(
            f"world size {max(worlds)} needs one GPU per rank but {have} GPU(s) are visible; "
            "lower --world-sizes (or use SLIMTORCH_DIST_BACKEND=gloo to share one GPU, which "
            "measures nothing about scaling)"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--data-root", default=None, help="dataset folder (else $SLIMTORCH_DATA)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--world-sizes", type=_ints, default=[1, 2])
    ap.add_argument("--per-rank-batches", type=_ints, default=[256, 1024])
    ap.add_argument("--epochs", type=int, default=3, help="epochs of each throughput run")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--threads", type=positive_int, default=4, help="CPU threads per process")
    ap.add_argument("--ddp-one", action="store_true", help="also time DDP with one rank")
    ap.add_argument("--parity-epochs", type=int, default=0, help="0: no accuracy runs")
    ap.add_argument("--parity-batch", type=int, default=256, help="global batch of parity runs")
    ap.add_argument(
        "--seeds", type=lambda t: _ints(t, 0), default=[0], help="seeds of the parity runs"
    )
    ap.add_argument("--run-dir", default=None, help="keep the runs here (default: beside --out)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per run")
    ap.add_argument("--out", required=True, help="JSON output path")
    args = ap.parse_args(argv)
    worlds = sorted(set(args.world_sizes))
    check_devices(args.device, worlds)
    if 1 not in worlds:
        ap.error("--world-sizes must include 1: the other sizes are measured against it")
    bad = [w for w in worlds if args.parity_epochs and args.parity_batch % w]
    if bad:
        ap.error(f"--parity-batch {args.parity_batch} does not split over world size(s) {bad}")
    root = Path(args.run_dir) if args.run_dir else Path(args.out).with_suffix("")
    result: dict[str, Any] = {
        **run_info(args.device),
        "command": " ".join([sys.executable, *sys.argv]),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "throughput": [],
        "parity": [],
    }

    rows = [(w, b, False) for b in args.per_rank_batches for w in worlds]
    if args.ddp_one:
        rows += [(1, b, True) for b in args.per_rank_batches]
    for world, batch, forced in rows:
        name = f"thr-w{world}{'-ddp' if forced else ''}-b{batch}"
        out = root / name
        _, seconds = launch(world, _train_args(args, out, world * batch, args.epochs, 0),
                            force_ddp=forced, timeout=args.timeout)  # fmt: skip
        run = read_run(out)
        result["throughput"].append(
            {
                "world_size": world,
                "per_rank_batch": batch,
                "ddp": forced or world > 1,
                "wall_s": seconds,
                **run,
            }
        )
        print(f"{name}: {run['images_per_s_median'] or 0:,.0f} images/s", flush=True)
        _add_speedups(result)
        atomic_write_json(args.out, result)  # what has run so far survives a later failure

    if args.parity_epochs:
        for seed in args.seeds:
            for world in worlds:
                out = root / f"parity-w{world}-seed{seed}"
                _, seconds = launch(world, _train_args(args, out, args.parity_batch,
                                                       args.parity_epochs, seed),
                                    timeout=args.timeout)  # fmt: skip
                run = read_run(out)
                result["parity"].append({"world_size": world, "seed": seed,
                                         "global_batch": args.parity_batch, "wall_s": seconds,
                                         **run})  # fmt: skip
                print(f"parity w{world} seed {seed}: top-1 {run['test_accuracy']:.4f}", flush=True)
                atomic_write_json(args.out, result)
    atomic_write_json(args.out, result)

    print(f"\n{'world':>5} {'ddp':>4} {'batch/rank':>10} {'images/s':>12} {'speed-up':>9} "
          f"{'efficiency':>10} {'ranks same':>10}")  # fmt: skip
    for r in result["throughput"]:
        print(f"{r['world_size']:>5} {str(r['ddp'])[0]:>4} {r['per_rank_batch']:>10} "
              f"{r['images_per_s_median'] or 0:>12,.0f} {r.get('speedup', 0):>8.2f}x "
              f"{r.get('efficiency', 0):>10.2f} {r['ranks_consistent']!s:>10}")  # fmt: skip
    for world in worlds if result["parity"] else []:
        accs = [r["test_accuracy"] for r in result["parity"] if r["world_size"] == world]
        same = [r["ranks_consistent"] for r in result["parity"] if r["world_size"] == world]
        print(f"parity: {world} rank(s), global batch {args.parity_batch}: top-1 "
              f"{' / '.join(f'{a:.4f}' for a in accs)} (mean {statistics.mean(accs):.4f}), "
              f"ranks consistent {same}")  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
