"""FP32 vs FP16 vs BF16: measured latency at one batch size, with roofline estimates beside it.

For each model (randomly initialised zoo models: latency does not depend on the weights) and
each variant, the script measures eager forward latency on ``--device`` (rounds interleaved so
that drift hits every variant alike), the relative output error against fp32, the size, and
the roofline estimate on the RX 580 (where fp16 computes at the fp32 rate) and on
``--profile``. Variants:

- ``fp32``: the model as built;
- ``<dtype>-rules``: ``cast_`` with the default keep-in-fp32 rules (first, last, norm layers);
- ``<dtype>-folded``: batch norms folded first (``fold_bn_``), then ``cast_`` keeping the first
  and last layer in fp32 (no norm boundaries left);
- ``<dtype>-all``: every layer cast (``keep_fp32=()``), the upper bound of the speed-up.

    python scripts/bench_lowp.py --device cuda --profile h100-sxm --batch 256 \
        --out results/lowp_h100.json
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from _bench_common import positive_int
from torch import nn

from slimtorch.core.devices import run_info
from slimtorch.core.io import atomic_write_json
from slimtorch.core.measure import estimate_latency, measure_latency, model_size_bytes
from slimtorch.core.profiles import list_profiles
from slimtorch.models import create_model
from slimtorch.quant.fold import fold_bn_
from slimtorch.quant.lowp import LowPrecisionConfig, cast_, precision_gain

log = logging.getLogger("bench_lowp")


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "vgg11-bn"])
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--profile",
        default=None,
        help=f"device profile of --device, estimated beside rx580 ({', '.join(list_profiles())})",
    )
    p.add_argument("--batch", type=positive_int, default=256)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=("fp16", "bf16"))
    p.add_argument("--rounds", type=positive_int, default=3, help="interleaved measurement rounds")
    p.add_argument("--min-time", type=float, default=0.5, help="seconds per measurement")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.profile is not None and args.profile not in list_profiles():
        p.error(f"--profile {args.profile!r} is not a device profile; choose one of "
                f"{', '.join(list_profiles())}")  # fmt: skip
    return args


def _variants(model: nn.Module, x: torch.Tensor, dtype: str) -> dict[str, tuple[nn.Module, Any]]:
    out: dict[str, tuple[nn.Module, Any]] = {}
    loose: dict[str, Any] = {"max_output_error": None, "max_accuracy_drop": None}
    rules = copy.deepcopy(model)
    out[f"{dtype}-rules"] = (
        rules,
        cast_(rules, LowPrecisionConfig(dtype=dtype, **loose), check_inputs=x[:16]),
    )
    folded = copy.deepcopy(model)
    fold_bn_(folded)
    cfg = LowPrecisionConfig(dtype=dtype, keep_fp32=("first", "last"), **loose)
    out[f"{dtype}-folded"] = (folded, cast_(folded, cfg, check_inputs=x[:16]))
    every = copy.deepcopy(model)
    cfg = LowPrecisionConfig(dtype=dtype, keep_fp32=(), **loose)
    out[f"{dtype}-all"] = (every, cast_(every, cfg, check_inputs=x[:16]))
    return out


@torch.no_grad()
def _bench_model(name: str, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = create_model(
        name, num_classes=10, in_channels=args.in_channels, input_size=args.input_size
    ).to(device)
    x = torch.randn(args.batch, args.in_channels, args.input_size, args.input_size, device=device)
    model.train()
    model(x[:64])  # non-trivial batch-norm statistics
    model.eval()
    ref = model(x).float()
    variants: dict[str, tuple[nn.Module, Any]] = {"fp32": (model, None)}
    for dtype in args.dtypes:
        variants.update(_variants(model, x, dtype))
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for key, (m, _report) in variants.items():
            r = measure_latency(
                m, x, warmup=3, repeats=5, min_time_s=args.min_time, threads=args.threads
            )
            times[key].append(r.median_s)
    rows = []
    base = statistics.median(times["fp32"])
    for key, (m, report) in variants.items():
        out = m(x).float()
        med = statistics.median(times[key])
        dtype = "fp32" if key == "fp32" else key.split("-")[0]
        row: dict[str, Any] = {
            "model": name,
            "variant": key,
            "batch": args.batch,
            "latency_ms": med * 1e3,
            "latency_ms_rounds": [t * 1e3 for t in times[key]],
            "speedup_vs_fp32": base / med,
            "output_error": float((out - ref).norm() / ref.norm()),
            "size_bytes": model_size_bytes(m),
            "est_rx580_ms": estimate_latency(m, x, "rx580").total_s * 1e3,
            "rx580_gain": None if key == "fp32" else precision_gain("rx580", dtype)[0],
        }
        if args.profile:
            row["est_profile_ms"] = estimate_latency(m, x, args.profile).total_s * 1e3
            row["profile_gain"] = None if key == "fp32" else precision_gain(args.profile, dtype)[0]
        if report is not None:
            row["kept_fp32"] = [r.name for r in report.rows if r.dtype == "float32"]
        rows.append(row)
        log.info(
            "%s %-12s %8.3f ms  x%.2f  err %.2e",
            name,
            key,
            med * 1e3,
            base / med,
            row["output_error"],
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = [row for name in args.models for row in _bench_model(name, args, device)]
    out = {
        "benchmark": "lowp",
        **run_info(device, [sys.argv[0], *(argv or sys.argv[1:])]),
        "input_shape": [args.in_channels, args.input_size, args.input_size],
        "profile": args.profile,
        "rows": rows,
    }
    atomic_write_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
