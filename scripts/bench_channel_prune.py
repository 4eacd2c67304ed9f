"""Channel-pruning benchmark: MAC and parameter ratios against measured speed-up, per batch size.

For each ratio, the model is pruned twice, with channel counts rounded to ``--round-to``
(8 by default) and without rounding (``round_to=1``). For every batch size of the curve, the
dense and the pruned model are timed side by side in one run with
``slimtorch.core.measure.measure_latency`` (warm-up, device sync, median), so the reported
speed-up is ``dense median / pruned median`` measured, next to the MAC ratio that a paper would
quote. Writes one JSON file (``--out``, atomically) and prints a table. From the repository root:

    python scripts/bench_channel_prune.py --model resnet20 --device cpu --threads 2 \
        --batches 1,8,32 --out /tmp/bcp.json
    python scripts/bench_channel_prune.py --model-dir runs/resnet20 --device cuda \
        --dtype float16 --compile --ratios 0.25,0.5,0.75 --out docs/results/channel-cuda.json

Without ``--model-dir`` a freshly initialised zoo model is used (latency does not depend on the
weights; which channels go does, but not how many). A batch that runs out of memory is recorded
as such and the curve goes on.
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

from slimtorch.core.devices import cpu_threads, resolve_device, run_info
from slimtorch.core.io import atomic_write_json
from slimtorch.core.measure import GraphedForward, count_flops, count_params, measure_latency
from slimtorch.models import create_model, load_model
from slimtorch.prune.channel import ChannelPruneConfig, prune_channels_

log = logging.getLogger("bench_channel_prune")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model-dir",
        type=model_dir_type("--model-dir"),
        help="a slimtorch model directory, or the run directory holding it (else --model is "
        "created)",
    )
    p.add_argument("--model", default="resnet20", help="zoo model when no --model-dir")
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--ratios", type=_floats, default=[0.25, 0.5, 0.75])
    p.add_argument("--round-to", type=int, default=8, help="compared against no rounding (1)")
    p.add_argument("--importance", default="l1", choices=["l1", "l2", "bn_scale"])
    p.add_argument("--scope", default="local", choices=["local", "global"])
    p.add_argument("--batches", type=positive_ints, default=[1, 8, 64, 256, 1024, 4096])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument(
        "--threads", type=positive_int, default=None, help="CPU threads (default: torch's)"
    )
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--compile", action="store_true", help="torch.compile dense and pruned")
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="replay each model's forward as a CUDA graph (one per batch; no host launches)",
    )
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=positive_int, default=10)
    p.add_argument("--min-time", type=float, default=0.2, help="seconds timed per point")
    p.add_argument(
        "--rounds",
        type=positive_int,
        default=3,
        help="alternate dense/pruned timings this many times",
    )
    p.add_argument("--out", help="JSON output file")
    args = p.parse_args(argv)
    if args.cuda_graphs and args.compile:
        p.error("--cuda-graphs and --compile are alternatives; pick one")
    return args


def _base_model(args: argparse.Namespace) -> tuple[nn.Module, tuple[int, int, int], str]:
    if args.model_dir:
        model, card = load_model(args.model_dir)
        c, h, w = card.input_shape
        return model, (c, h, w), f"{card.architecture['name']} ({args.model_dir})"
    model = create_model(
        args.model,
        num_classes=args.num_classes,
        in_channels=args.in_channels,
        input_size=args.input_size,
    )
    return model, (args.in_channels, args.input_size, args.input_size), f"{args.model} (fresh)"


def _prepare(model: nn.Module, args: argparse.Namespace, device: torch.device) -> Any:
    model = model.to(device=device, dtype=DTYPES[args.dtype]).eval()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if args.compile:
        return torch.compile(model)
    return GraphedForward(model) if args.cuda_graphs else model


def _time(fn: Any, x: torch.Tensor, args: argparse.Namespace, device: torch.device) -> float:
    res = measure_latency(
        fn,
        x,
        device=device,
        warmup=args.warmup,
        repeats=args.repeats,
        min_time_s=args.min_time,
        threads=args.threads,
    )
    return res.median_s


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _widths(model: nn.Module) -> list[tuple[int, ...]]:
    return [tuple(p.shape) for p in model.parameters()]


def _curve_point(
    prepared: dict[str, Any], x: torch.Tensor, args: argparse.Namespace, device: torch.device
) -> dict[str, float | None]:
    """Median latency per model at one batch; models alternate over ``args.rounds`` rounds."""
    samples: dict[str, list[float]] = {k: [] for k in prepared}
    failed: set[str] = set()
    for _ in range(max(1, args.rounds)):
        for key, fn in prepared.items():
            if key in failed:
                continue
            try:
                samples[key].append(_time(fn, x, args, device))
            except RuntimeError as exc:
                if not _is_oom(exc):
                    raise
                log.warning("batch %d: %s ran out of memory", x.shape[0], key)
                failed.add(key)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return {k: statistics.median(v) if k not in failed and v else None for k, v in samples.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Prune at every ratio with and without rounding, and time every batch of the curve."""
    device = resolve_device(args.device)
    base, shape, label = _base_model(args)
    base = base.cpu().float().eval()
    example = torch.randn(2, *shape)
    dense_macs = count_flops(base, example[:1]).total_macs
    dense_params = count_params(base)
    variants: list[dict[str, Any]] = []
    models: dict[str, nn.Module] = {"dense": base}
    for ratio in args.ratios:
        for round_to in dict.fromkeys([args.round_to, 1]):
            model = copy.deepcopy(base)
            cfg = ChannelPruneConfig(
                ratio=ratio, round_to=round_to, importance=args.importance, scope=args.scope
            )
            report = prune_channels_(model, cfg, example)
            key = f"r{ratio:g}-round{round_to}"
            models[key] = model
            variants.append(
                {
                    "key": key,
                    "ratio": ratio,
                    "round_to": round_to,
                    "mac_ratio": count_flops(model, example[:1]).total_macs / dense_macs,
                    "params_ratio": count_params(model) / dense_params,
                    "groups_pruned": len(report.pruned),
                    "groups_skipped": len(report.skipped),
                    "latency_s": {},
                    "speedup": {},
                }
            )
    for v in variants:  # rounding may leave the widths as they were without it
        same = [w["key"] for w in variants if w is not v and w["ratio"] == v["ratio"]]
        v["same_widths_as"] = [k for k in same if _widths(models[k]) == _widths(models[v["key"]])]
    dense_times: dict[int, float | None] = {}
    with cpu_threads(args.threads) as threads:
        prepared = {k: _prepare(m, args, device) for k, m in models.items()}
        for batch in args.batches:
            x = torch.randn(batch, *shape, device=device, dtype=DTYPES[args.dtype])
            if args.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            times = _curve_point(prepared, x, args, device)
            dense = times["dense"]
            dense_times[batch] = dense
            for v in variants:
                t = times[v["key"]]
                v["latency_s"][str(batch)] = t
                v["speedup"][str(batch)] = dense / t if dense and t else None
            for fn in prepared.values():  # graphs of this batch hold their own memory pools
                if isinstance(fn, GraphedForward):
                    fn.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {
        "benchmark": "channel_prune",
        **run_info(device),
        "model": label,
        "input_shape": list(shape),
        "threads": threads,
        "dtype": args.dtype,
        "compile": args.compile,
        "cuda_graphs": args.cuda_graphs,
        "rounds": args.rounds,
        "channels_last": args.channels_last,
        "torch": torch.__version__,
        "importance": args.importance,
        "scope": args.scope,
        "batches": args.batches,
        "dense": {
            "macs": dense_macs,
            "params": dense_params,
            "latency_s": {str(b): t for b, t in dense_times.items()},
        },
        "variants": variants,
    }


def table(result: dict[str, Any]) -> str:
    """One line per variant: MAC and params ratio, then the measured speed-up per batch."""
    batches = [str(b) for b in result["batches"]]
    head = f"{'variant':<18} {'MACs':>6} {'params':>7}  "
    head += " ".join(f"{'b' + b:>7}" for b in batches)
    lines = [head]
    for v in result["variants"]:
        cells = [
            f"{s:>6.2f}x" if (s := v["speedup"][b]) is not None else f"{'oom':>7}" for b in batches
        ]
        lines.append(
            f"{v['key']:<18} {v['mac_ratio']:>6.3f} {v['params_ratio']:>7.3f}  " + " ".join(cells)
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    result = run(args)
    print(
        f"{result['model']} on {result['device']} ({result['device_name']}), {result['dtype']}, "
        f"threads={result['threads']}, compile={result['compile']}, "
        f"cuda_graphs={result.get('cuda_graphs', False)}; speed-up = dense / pruned"
    )
    print(table(result))
    if args.out:
        atomic_write_json(args.out, result)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
