"""Does Tucker-2 pay on this device, and in which memory layout? Dense vs factorised, NCHW vs NHWC.

For each model (fresh weights: only speed is measured), every 3x3 convolution with more than one
input channel is factorised by Tucker-2 at rank ``--rank`` (a fraction of each channel mode).
Then, in both layouts (contiguous NCHW and ``torch.channels_last``):

1. each layer alone, dense vs factorised, at the ``--layer-batches`` (its real input shape);
2. whole models over ``--batches``: dense vs all layers factorised, and dense vs only the layers
   that were >= ``--min-speedup`` faster at every layer batch in that layout ("gated");
3. the same three models under ``torch.compile`` at the largest batch;
4. the dense model in NCHW vs NHWC at the largest batch (what the layout alone buys).

Timings alternate A and B (ABBA...) and report medians, so drift hits both alike. Run:

    python scripts/bench_tucker_layout.py --models vgg11-bn,resnet56 --device cuda --out r.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from _bench_common import positive_int, positive_ints
from torch import nn

from slimtorch.core.io import atomic_write_json
from slimtorch.core.measure import measure_latency
from slimtorch.decompose import TuckerConfig, decompose_
from slimtorch.models import create_model


def _t(m: Any, x: torch.Tensor, dev: torch.device) -> float:
    return measure_latency(m, x, device=dev, warmup=3, repeats=5, min_time_s=0.05).median_s


def side_by_side(
    a: Any, b: Any, x: torch.Tensor, dev: torch.device, rounds: int
) -> tuple[float, float]:
    """Median seconds of a and b over alternating rounds."""
    ta, tb = [], []
    with torch.inference_mode():
        for r in range(rounds):
            pair = ((a, ta), (b, tb)) if r % 2 == 0 else ((b, tb), (a, ta))
            for m, times in pair:
                times.append(_t(m, x, dev))
    return statistics.median(ta), statistics.median(tb)


def _layout(m: nn.Module, nhwc: bool) -> nn.Module:
    return m.to(memory_format=torch.channels_last) if nhwc else m  # type: ignore[call-overload]


def _input(shape: tuple[int, ...], dev: torch.device, nhwc: bool) -> torch.Tensor:
    x = torch.randn(shape, device=dev)
    return x.contiguous(memory_format=torch.channels_last) if nhwc else x


def run_model(name: str, args: argparse.Namespace, dev: torch.device) -> dict[str, Any]:
    base = create_model(name, num_classes=10, in_channels=1, input_size=28).to(dev).eval()
    convs = [
        n
        for n, m in base.named_modules()
        if isinstance(m, nn.Conv2d) and m.in_channels > 1 and m.kernel_size != (1, 1)
    ]
    fact = copy.deepcopy(base)
    decompose_(fact, TuckerConfig(rank=args.rank), include=convs)
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        base.get_submodule(n).register_forward_hook(
            lambda mod, i, o, n=n: shapes.__setitem__(n, tuple(i[0].shape[1:]))
        )
        for n in convs
    ]
    with torch.no_grad():
        base(torch.randn(2, 1, 28, 28, device=dev))
    for h in hooks:
        h.remove()
    out: dict[str, Any] = {"layers": [], "models": [], "compiled": [], "factorised": len(convs)}
    big = args.batches[-1]
    for nhwc in (False, True):
        tag = "NHWC" if nhwc else "NCHW"
        faster = []
        for n in convs:
            row: dict[str, Any] = {"layout": tag, "layer": n, "input": list(shapes[n])}
            for b in args.layer_batches:
                d = _layout(copy.deepcopy(base.get_submodule(n)), nhwc)
                f = _layout(copy.deepcopy(fact.get_submodule(n)), nhwc)
                td, tf = side_by_side(d, f, _input((b, *shapes[n]), dev, nhwc), dev, 3)
                row[f"speedup_b{b}"] = td / tf
            if all(row[f"speedup_b{b}"] >= args.min_speedup for b in args.layer_batches):
                faster.append(n)
            out["layers"].append(row)
            print(
                f"{name} {tag} {n} {shapes[n]}: "
                + ", ".join(f"b{b} {row[f'speedup_b{b}']:.2f}x" for b in args.layer_batches),
                flush=True,
            )
        gated = copy.deepcopy(base)
        if faster:
            decompose_(gated, TuckerConfig(rank=args.rank), include=faster)
        models = {
            "dense": _layout(copy.deepcopy(base), nhwc),
            "all": _layout(copy.deepcopy(fact), nhwc),
            "gated": _layout(gated, nhwc),
        }
        for b in args.batches:
            x = _input((b, 1, 28, 28), dev, nhwc)
            d1, a1 = side_by_side(models["dense"], models["all"], x, dev, args.rounds)
            d2, g2 = side_by_side(models["dense"], models["gated"], x, dev, args.rounds)
            rec = {
                "layout": tag,
                "batch": b,
                "dense_ms": d1 * 1e3,
                "all_speedup": d1 / a1,
                "gated_speedup": d2 / g2,
                "gated_layers": len(faster),
            }
            out["models"].append(rec)
            print(
                f"{name} {tag} b{b}: dense {d1 * 1e3:.3f} ms, all factorised {d1 / a1:.2f}x, "
                f"gated ({len(faster)}/{len(convs)}) {d2 / g2:.2f}x",
                flush=True,
            )
        comp = {k: torch.compile(m) for k, m in models.items()}
        x = _input((big, 1, 28, 28), dev, nhwc)
        d1, a1 = side_by_side(comp["dense"], comp["all"], x, dev, args.rounds)
        d2, g2 = side_by_side(comp["dense"], comp["gated"], x, dev, args.rounds)
        out["compiled"].append(
            {
                "layout": tag,
                "batch": big,
                "dense_ms": d1 * 1e3,
                "all_speedup": d1 / a1,
                "gated_speedup": d2 / g2,
            }
        )
        print(
            f"{name} {tag} b{big} compiled: dense {d1 * 1e3:.3f} ms, all {d1 / a1:.2f}x, "
            f"gated {d2 / g2:.2f}x",
            flush=True,
        )
    nchw, nhwc_m = copy.deepcopy(base), _layout(copy.deepcopy(base), True)
    x = _input((big, 1, 28, 28), dev, True)
    a, b = side_by_side(nchw, nhwc_m, x, dev, args.rounds)
    out["dense_nchw_vs_nhwc_ms"] = [a * 1e3, b * 1e3]
    print(f"{name} dense b{big}: NCHW {a * 1e3:.2f} ms, NHWC {b * 1e3:.2f} ms", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vgg11-bn,resnet56")
    ap.add_argument("--rank", type=float, default=0.25)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", type=positive_ints, default=[1, 16, 256, 1024, 4096])
    ap.add_argument("--layer-batches", type=positive_ints, default=[256, 4096])
    ap.add_argument("--min-speedup", type=float, default=1.05)
    ap.add_argument("--rounds", type=positive_int, default=5)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    result: dict[str, Any] = {
        "command": "python scripts/bench_tucker_layout.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "models": {m: run_model(m, args, dev) for m in args.models.split(",")},
    }
    atomic_write_json(Path(args.out), result)
    return result


if __name__ == "__main__":
    main()
