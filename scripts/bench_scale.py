"""Large-model costs of the toolkit's own algorithms: time and peak memory at VGG-16 sizes.

Each step runs on random tensors of a large model's sizes (accuracy is not the point) and,
where the earlier method is still a one-line torch call, times that too on the same input:

- magnitude masks: the k lowest of 50M scores by threshold, against a full stable sort;
- truncated SVD of a long weight (Gram route) against ``torch.linalg.svd``;
- sparse format sizes of a 4096 x 25088 weight at 10% density, counted against encoded;
- bitmask packing of that weight's mask against numpy's ``packbits``;
- budget rank selection over 100 / 300 / 600 Tucker-like layers (99 rungs each);
- the mixed-precision knapsack over 300 layers with byte costs.

Pin it to one core for stable figures:

    taskset -c 1 python scripts/bench_scale.py --out results.json
"""

from __future__ import annotations

import argparse
import math
import random
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from _bench_common import command_line, cpu_name

from slimtorch.core.io import atomic_write_json
from slimtorch.decompose.budget import LayerLadder, RankOption, select_ranks_for_budget
from slimtorch.decompose.svd import truncated_svd
from slimtorch.prune.masks import lowest_k
from slimtorch.prune.storage import pack_bits
from slimtorch.quant.knapsack import allocate
from slimtorch.sparse.formats import BLOCKS, FORMATS, _nbytes, encode, encode_bsr, format_nbytes


def _timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _encoded_sizes(t: torch.Tensor) -> dict[str, int]:
    """The earlier way: encode in every format (BSR at every block that fits)."""
    out = {}
    for fmt in FORMATS:
        try:
            if fmt == "bsr":
                out[fmt] = min(_nbytes(encode_bsr(t, b)) for b in BLOCKS if _fits(t, b))
            else:
                out[fmt] = _nbytes(encode(t, fmt))
        except ValueError:
            continue
    return out


def _fits(t: torch.Tensor, block: tuple[int, int]) -> bool:
    rows, cols = t.shape[0], math.prod(t.shape[1:])
    return rows % block[0] == 0 and cols % block[1] == 0


def _ladders(n: int) -> list[LayerLadder]:
    rng = random.Random(0)
    layers = []
    for i in range(n):
        c_out, c_in = rng.choice([64, 128, 256]), rng.choice([64, 128, 256])
        options = [RankOption((), 0.0, c_out * c_in * 9)]
        for r_out in range(c_out // 7, c_out + 1, c_out // 7)[:7]:
            for r_in in range(c_in // 14, c_in + 1, c_in // 14)[:14]:
                kept = (r_out / c_out) ** 0.5 * (r_in / c_in) ** 0.5
                params = c_in * r_in + 9 * r_in * r_out + r_out * c_out
                error = math.sqrt(max(1 - kept, 0.0)) * rng.uniform(0.9, 1.1)
                options.append(RankOption((r_out, r_in), error, params))
        layers.append(LayerLadder(f"layer{i}", options, rng.uniform(0.5, 2.0)))
    return layers


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="tiny sizes to check the script runs")
    args = ap.parse_args(argv)
    div = 64 if args.quick else 1
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []

    def row(step: str, new_s: float, old_s: float | None, same: bool | None, note: str) -> None:
        rows.append({"step": step, "new_s": new_s, "old_s": old_s, "same": same, "note": note,
                     "peak_rss_mib": _peak_mib()})  # fmt: skip
        old = "-" if old_s is None else f"{old_s:.2f} s"
        print(f"{step:<34} new {new_s:7.2f} s  old {old:>9}  same: {same}  {note}", flush=True)

    scores = torch.rand(50_000_000 // div**2)
    k = int(0.9 * scores.numel())
    new_s, picked = _timed(lowest_k, scores, k)
    old_s, order = _timed(torch.sort, scores, stable=True)
    order = order.indices[:k]
    same = bool(picked.sum() == k) and bool(picked[order].all())
    row("k lowest of 50M (sparsity 0.9)", new_s, old_s, same, "threshold vs stable sort")

    w = torch.randn(1024 // div, 6272 // div)
    new_s, (a, b) = _timed(truncated_svd, w, 256 // div)
    old_s, (_, s, _) = _timed(torch.linalg.svd, w, full_matrices=False)
    w64 = w.double()
    err = float(((a @ b).double() - w64).norm() / w64.norm())
    best = float(s.double()[256 // div :].norm() / s.double().norm())
    row("SVD 1024x6272, rank 256", new_s, old_s, abs(err - best) < 1e-6,
        f"error {err:.6f}, optimum {best:.6f}")  # fmt: skip

    shape = (4096 // div, 25088 // div)
    keep = torch.rand(shape) < 0.1
    weight = torch.where(keep, torch.randn(shape), 0.0)  # +0.0: -0.0 counts as stored
    new_s, sizes = _timed(format_nbytes, weight)
    old_s, encoded = _timed(_encoded_sizes, weight)
    row("format sizes 4096x25088 at 10%", new_s, old_s, sizes == encoded, str(sizes))
    mask = weight != 0
    new_s, packed = _timed(pack_bits, mask)
    old_s, ref = _timed(np.packbits, mask.numpy(), bitorder="little")
    row("bitmask pack 4096x25088", new_s, old_s, bool(np.array_equal(packed.numpy(), ref)),
        "old: numpy's packbits, which the CPU path now calls")  # fmt: skip

    for n in (10,) if args.quick else (100, 300, 600):
        layers = _ladders(n)
        dense = sum(layer.options[0].params for layer in layers)
        new_s, _ = _timed(select_ranks_for_budget, layers, target=0.4 * dense)
        row(f"budget ranks, {n} layers", new_s, None, None, "99 rungs a layer, 40% of dense")

    rng = random.Random(0)
    costs, losses = {}, {}
    for i in range(max(1, 300 // div)):
        n = rng.choice([16, 32, 64]) * rng.choice([16, 32, 64]) * 9 + 2 * rng.randrange(50)
        costs[f"l{i}"] = {"fp16": 2.0 * n, "int8": float(n), "int4": n / 2}  # gcd 1 byte
        losses[f"l{i}"] = {"fp16": 0.0, "int8": rng.random() * 0.01, "int4": rng.random()}
    budget = sum(c["int8"] for c in costs.values()) * 0.8
    new_s, _ = _timed(allocate, losses, costs, budget)
    units = int(budget)
    row(f"mixed-precision knapsack, {len(costs)}", new_s, None, None,
        f"{units:,} byte units x {len(costs)} layers (binned above 128M cells)")  # fmt: skip

    result = {"command": command_line("scripts/bench_scale.py", argv), "device": cpu_name(),
              "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": 1,
              "rows": rows}  # fmt: skip
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
