"""Sparse kernels vs dense, per layer of a pruned model, and what the measured chooser picks.

For each batch size, every conv/linear layer of the pruned model is timed at its real input
shape (captured by one forward pass) as dense, CSR, BSR and 2:4 semi-structured (where the
device has those kernels; elsewhere the JSON says 2:4 is storage-only) by ``sparsify_`` with
``min_sparsity=0`` (so every layer is measured), and the whole model is timed before and after
the swap, alternately over ``--rounds`` rounds in the same run (the per-round ratio is what
to quote: on a shared machine absolute times drift). Writes one JSON file (``--out``,
atomically) and prints a per-layer table. Run from the repository root:

    python scripts/bench_sparse.py --model resnet20 --prune magnitude --sparsity 0.9 \
        --device cpu --threads 2 --batches 1,64 --out /tmp/bench-sparse-cpu.json
    python scripts/bench_sparse.py --model mlp --prune nm24 --device cuda --batches 1,64,1024 \
        --dtype float16 --out /tmp/bench-sparse-gpu.json
    python scripts/bench_sparse.py --model-dir runs/resnet20/model --prune magnitude \
        --sparsity 0.95 --device cpu --threads 2 --out /tmp/bench-sparse-dir.json

A model directory that is already pruned (masks saved by ``save_model``) is used as is with
``--prune none``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
from typing import Any

import torch
from _bench_common import model_dir_type, positive_int, positive_ints
from torch import nn

from slimtorch.core.devices import resolve_device, run_info
from slimtorch.core.io import atomic_write_json
from slimtorch.core.measure import measure_latency
from slimtorch.models import create_model, load_model
from slimtorch.prune import MagnitudeConfig, NMConfig, prune_
from slimtorch.sparse import KERNEL_FORMATS, sparsify_

log = logging.getLogger("bench_sparse")


def build(args: argparse.Namespace) -> tuple[nn.Module, tuple[int, int, int], dict[str, Any]]:
    """The model, one input's shape, and what was done to it."""
    if args.model_dir:
        model, card = load_model(args.model_dir)
        c, h, w = card.input_shape
        shape = (int(c), int(h), int(w))
        source: dict[str, Any] = {"model_dir": str(args.model_dir), **card.architecture}
    else:
        shape = (args.in_channels, args.input_size, args.input_size)
        torch.manual_seed(args.seed)
        model = create_model(
            args.model,
            num_classes=args.num_classes,
            in_channels=args.in_channels,
            input_size=args.input_size,
        )
        source = {"model": args.model, "seed": args.seed}
    if args.prune == "magnitude":
        report = prune_(model, MagnitudeConfig(sparsity=args.sparsity))
        source["prune"] = report.to_dict()["totals"]
    elif args.prune == "nm24":
        report = prune_(model, NMConfig(n=2, m=4))
        source["prune"] = report.to_dict()["totals"]
    source["prune_method"] = args.prune
    dtype = getattr(torch, args.dtype)
    return model.eval().to(dtype=dtype), shape, source


def run_batch(
    base: nn.Module, shape: tuple[int, int, int], batch: int, args: argparse.Namespace
) -> dict[str, Any]:
    device = resolve_device(args.device)
    model = copy.deepcopy(base).to(device)
    dtype = next(model.parameters()).dtype
    x = torch.randn(batch, *shape, device=device, dtype=dtype)
    timing = {"threads": args.threads, "min_time_s": args.min_time, "warmup": 5, "repeats": 20}
    with torch.inference_mode():
        ref = model(x)
    dense_model = copy.deepcopy(model)
    report = sparsify_(
        model,
        x,
        formats=args.formats,
        min_speedup=args.min_speedup,
        min_sparsity=0.0,
        threads=args.threads,
        min_time_s=args.min_time,
    )
    # whole-model times, dense and sparsified alternately (A B A B ...): on a shared machine a
    # single back-to-back pair can differ by 2x from load alone; the per-round ratio is robust
    dense_s, sparse_s, ratios = [], [], []
    for _ in range(args.rounds):
        a = measure_latency(dense_model, x, **timing).median_s
        b = measure_latency(model, x, **timing).median_s
        dense_s.append(a)
        sparse_s.append(b)
        ratios.append(a / b)
    with torch.inference_mode():
        err = float((model(x).float() - ref.float()).abs().max())
    before, after, ratio = (
        statistics.median(dense_s),
        statistics.median(sparse_s),
        statistics.median(ratios),
    )
    print(f"\n== batch {batch} on {device} ({args.threads} threads) ==")
    print(report.to_table())
    print(
        f"model ({args.rounds} alternating rounds): dense {before * 1e3:.3f} ms, after sparsify_ "
        f"{after * 1e3:.3f} ms, median per-round speed-up {ratio:.2f}x "
        f"(range {min(ratios):.2f}-{max(ratios):.2f}), max output change {err:.2e}"
    )
    return {
        "batch": batch,
        "report": report.to_dict(),
        "model_dense_median_s": dense_s,
        "model_sparsified_median_s": sparse_s,
        "model_speedup_per_round": ratios,
        "model_speedup": ratio,
        "max_abs_output_change": err,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", default="resnet20", help="zoo model name (fresh weights)")
    src.add_argument(
        "--model-dir",
        type=model_dir_type("--model-dir"),
        help="a slimtorch model directory, or the run directory holding it in model/",
    )
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--in-channels", type=int, default=3)
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--prune", choices=("magnitude", "nm24", "none"), default="magnitude")
    ap.add_argument("--sparsity", type=float, default=0.9, help="for --prune magnitude")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    ap.add_argument(
        "--threads", type=positive_int, default=None, help="CPU threads for every timing"
    )
    ap.add_argument("--batches", type=positive_ints, default=[1, 64])
    ap.add_argument("--formats", type=lambda s: s.split(","), default=list(KERNEL_FORMATS))
    ap.add_argument("--min-speedup", type=float, default=1.05)
    ap.add_argument("--min-time", type=float, default=0.2, help="least timed seconds per figure")
    ap.add_argument(
        "--rounds", type=positive_int, default=5, help="alternating whole-model timings"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="JSON output path")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    base, shape, source = build(args)
    results = [run_batch(base, shape, b, args) for b in args.batches]
    device = resolve_device(args.device)
    payload = {
        **run_info(device),
        "threads": args.threads if args.threads is not None else torch.get_num_threads(),
        "dtype": args.dtype,
        "input_shape": list(shape),
        "source": source,
        "batches": results,
    }
    atomic_write_json(args.out, payload)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
