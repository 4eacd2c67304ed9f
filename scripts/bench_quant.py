"""Benchmark static int8 PTQ on the CPU: accuracy, weight bytes and latency, two runtimes.

For one model (a trained model directory, or a fresh zoo model) on the dataset its model card
names (``--dataset``; Fashion-MNIST for a zoo model):

- PyTorch path: the fp32 model and the Q/DQ int8 model, both compiled with
  ``slimtorch.quant.runtime.compile_int8_x86`` (inductor + freezing; int8 runs oneDNN qconv).
- ONNX Runtime path: fp32 ONNX vs int8 Q/DQ ONNX (``export_onnx``), CPU provider.

``--placement runtime`` (default) places the Q/DQ steps for each runtime
(``place_qdq_``: conv + add fused for inductor, every conv output quantized for ONNX Runtime,
calibrated on the same batches); ``--placement portable`` runs the model as ``quantize_`` left
it in both runtimes (the earlier behaviour), for before/after comparisons.

``--gemm-layout`` adds a third path, ``pytorch_gemm``: the fp32 model with its few-tap stem
lowered to a channels-last direct convolution (``lower_direct_conv_``) and every other
convolution to im2col + linear (``lower_conv_gemm_``), then quantized on the same calibration
batches; both compiled with ``max_autotune`` so inductor's own C++ GEMM templates run them. Its
speed-up is int8 against that same rewritten fp32 model, timed side by side.

Latency is the median of ``measure_latency`` at fixed threads, fp32 and int8 timed alternately
(``--rounds`` times) so that drift on a shared machine hits both alike; the speed-up is the
median of the per-round fp32/int8 ratios, the times the medians over rounds.
Writes a JSON file and prints a table.

Example:
    .venv/bin/python scripts/bench_quant.py --model-dir runs/gpu/resnet20-fmnist/model \
        --data /work/shared/data --threads 2 --batches 1,32 --calibration-batches 16 \
        --out runs/bench_quant_resnet20.json
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _bench_common import card_dataset, cpu_name, model_dir_type, positive_int, positive_ints
from torch import nn

from slimtorch.core.io import atomic_write_json
from slimtorch.core.measure import measure_latency
from slimtorch.data import load_dataset
from slimtorch.models import create_model, load_model
from slimtorch.quant.convert import state_bytes
from slimtorch.quant.direct import DirectConvConfig, lower_direct_conv_
from slimtorch.quant.export import export_onnx, ort_int8_ops, ort_session, run_onnx
from slimtorch.quant.gemm import lower_conv_gemm_
from slimtorch.quant.ptq import PTQConfig, quantize_
from slimtorch.quant.runtime import compile_int8_x86, cpu_int8_support, int8_kernels

logger = logging.getLogger("bench_quant")


def _data(dataset: str, root: str | None, mean: float, std: float, n_test: int) -> tuple[Any, ...]:
    train = load_dataset(dataset, "train", root=root, download=False)
    test = load_dataset(dataset, "test", root=root, download=False)

    def prep(images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255 - mean) / std

    return prep(train.images), train.labels, prep(test.images[:n_test]), test.labels[:n_test]


def _accuracy(fn: Any, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += int((fn(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    return correct / len(x)


def _weight_bytes(model: nn.Module) -> int:
    """Bytes of the conv/linear layers' saved tensors (weights, scales, biases)."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear) or hasattr(m, "weight_int8"):
            total += state_bytes(m)
    return total


def _latency(
    fns: dict[str, Any], x: torch.Tensor, threads: int, rounds: int, min_time_s: float
) -> tuple[dict[str, float], dict[str, float]]:
    """Median latency of each variant over alternating rounds, and each int8 variant's speed-up
    over fp32 as the median of the per-round ratios (drift hits neighbours in a round alike)."""
    per_round: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            r = measure_latency(lambda fn=fn: fn(x), threads=threads, warmup=3,
                                min_time_s=min_time_s)  # fmt: skip
            per_round[name].append(r.median_s)
    ratios = {
        name: statistics.median(f / q for f, q in zip(per_round["fp32"], ts, strict=True))
        for name, ts in per_round.items()
        if name != "fp32"
    }
    return {k: statistics.median(v) for k, v in per_round.items()}, ratios


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--model-dir",
        type=model_dir_type("--model-dir"),
        help="a slimtorch model directory (trained model), or the run directory holding it",
    )
    src.add_argument("--model", help="a zoo model name, freshly initialised (timing only)")
    p.add_argument("--data", default=None, help="folder holding <dataset>/ (SLIMTORCH_DATA)")
    p.add_argument(
        "--dataset",
        default=None,
        help="dataset to calibrate and evaluate on (default: the model card's; fashion-mnist "
        "for --model)",
    )
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument(
        "--batches",
        type=positive_ints,
        default=[1, 32],
        help="batch sizes to time, comma-separated",
    )
    p.add_argument("--calibration-batches", type=positive_int, default=16)
    p.add_argument("--calibration-batch-size", type=positive_int, default=64)
    p.add_argument("--observer", default="minmax", choices=["minmax", "percentile", "mse"])
    p.add_argument("--test-samples", type=positive_int, default=10000)
    p.add_argument("--rounds", type=positive_int, default=15, help="alternating timing rounds")
    p.add_argument("--round-time", type=float, default=0.2, help="seconds per variant and round")
    p.add_argument(
        "--placement",
        default="runtime",
        choices=["runtime", "portable", "both"],
        help="Q/DQ placement per runtime, as quantize_ left it, or both timed side by side",
    )
    p.add_argument(
        "--gemm-layout",
        action="store_true",
        help="also time fp32 and int8 with convolutions as im2col + linear (max_autotune)",
    )
    p.add_argument("--skip-onnx", action="store_true")
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--out", default="bench_quant.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # one forward compiled per variant and batch shape: keep them all cached
    torch._dynamo.config.cache_size_limit = 64
    torch._dynamo.config.accumulated_cache_size_limit = 512

    if args.model_dir:
        model, card = load_model(args.model_dir)
        mean, std, name = card.mean[0], card.std[0], str(args.model_dir)
        dataset = card_dataset(card, args.dataset)
    else:
        model = create_model(args.model, num_classes=10, in_channels=1, input_size=28).eval()
        mean, std, name = 0.286, 0.353, args.model
        dataset = args.dataset or "fashion-mnist"
    root = str(Path(args.data) / dataset) if args.data else None
    xtr, _, xte, yte = _data(dataset, root, mean, std, args.test_samples)
    perm = torch.randperm(len(xtr))[: args.calibration_batches * args.calibration_batch_size]
    calib = list(xtr[perm].split(args.calibration_batch_size))

    fp32 = model.eval()
    int8 = copy.deepcopy(fp32)
    t0 = time.perf_counter()
    report = quantize_(int8, PTQConfig(mode="static", observer=args.observer), calibration=calib)
    ptq_s = time.perf_counter() - t0
    batches = args.batches
    res: dict[str, Any] = {
        "model": name,
        "dataset": dataset,
        "device": cpu_name(),
        "cpu_int8": cpu_int8_support(),
        "torch": torch.__version__,
        "threads": args.threads,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join([sys.executable, *sys.argv]),
        "ptq_seconds": ptq_s,
        "weight_bytes": {"fp32": _weight_bytes(fp32), "int8": _weight_bytes(int8)},
        "accuracy": {
            "eager_fp32": _accuracy(fp32, xte, yte),
            "eager_int8": _accuracy(int8, xte, yte),
        },
        "latency_ms": {},
    }
    res["weight_bytes"]["ratio"] = res["weight_bytes"]["fp32"] / res["weight_bytes"]["int8"]
    runners: dict[str, dict[str, Any]] = {}
    res["placement"] = args.placement
    variants = {  # int8 variant -> (inductor placement, ONNX Runtime placement)
        "runtime": {"int8": ("inductor", "onnxruntime")},
        "portable": {"int8": ("portable", "portable")},
        "both": {"int8": ("inductor", "onnxruntime"), "int8_portable": ("portable", "portable")},
    }[args.placement]
    if not args.skip_compile:
        runners["pytorch"] = {"fp32": compile_int8_x86(fp32)}
        for v, (target, _) in variants.items():
            res[f"kernels_pytorch_{v}"] = int8_kernels(int8, xte[:1], target=target)
            runners["pytorch"][v] = compile_int8_x86(int8, target=target)
    if args.gemm_layout:
        fp32_gemm = copy.deepcopy(fp32)
        lowered = lower_direct_conv_(fp32_gemm, DirectConvConfig(channels_last=True)).lowered
        rows = lower_conv_gemm_(fp32_gemm).rows
        res["gemm_layout"] = {
            "direct": [r.conv for r in lowered],
            "gemm": [r.conv for r in rows if r.action == "gemm"],
            "skipped": {r.conv: r.reason for r in rows if r.reason},
        }
        int8_gemm = copy.deepcopy(fp32_gemm)
        quantize_(int8_gemm, PTQConfig(mode="static", observer=args.observer), calibration=calib)
        res["accuracy"]["eager_gemm_fp32"] = _accuracy(fp32_gemm, xte, yte)
        res["accuracy"]["eager_gemm_int8"] = _accuracy(int8_gemm, xte, yte)
        runners["pytorch_gemm"] = {
            "fp32": compile_int8_x86(fp32_gemm, max_autotune=True),
            "int8": compile_int8_x86(int8_gemm, max_autotune=True),
        }
    if not args.skip_onnx:
        out_dir = Path(args.out).with_suffix("")
        paths = {"fp32": export_onnx(fp32, out_dir / "fp32.onnx", xte[:1])}
        for v, (_, target) in variants.items():
            paths[v] = export_onnx(int8, out_dir / f"{v}.onnx", xte[:1], target=target,
                                   calibration=calib)  # fmt: skip
            res[f"kernels_ort_{v}"] = ort_int8_ops(paths[v])
        sess = {k: ort_session(v, args.threads) for k, v in paths.items()}
        runners["ort"] = {k: (lambda x, s=s: run_onnx(s, x)) for k, s in sess.items()}
    for path, fns in runners.items():
        for v, fn in fns.items():
            res["accuracy"][f"{path}_{v}"] = _accuracy(fn, xte, yte)
        for b in batches:
            x = xte[:b].contiguous()
            t, ratios = _latency(fns, x, args.threads, args.rounds, args.round_time)
            row: dict[str, float] = {k: ms * 1e3 for k, ms in t.items()}
            row.update({f"speedup_{k}": r for k, r in ratios.items()})
            row["speedup"] = ratios["int8"]
            res["latency_ms"][f"{path}/b{b}"] = row
    res["report"] = report.to_dict()
    atomic_write_json(args.out, res)

    acc = res["accuracy"]
    print(f"model {name}  threads {args.threads}  placement {args.placement}  "
          f"cpu {res['cpu_int8']}")  # fmt: skip
    for key in [k for k in res if k.startswith("kernels_")]:
        print(f"{key:<28}{res[key]}")
    wb = res["weight_bytes"]
    print(f"weight bytes  fp32 {wb['fp32']:,}  int8 {wb['int8']:,}  ({wb['ratio']:.2f}x smaller)")
    names = ["int8", *(["int8_portable"] if args.placement == "both" else [])]

    def acc_cell(path: str, n: str) -> str:
        # a path without this variant (eager_gemm, pytorch_gemm: int8 only) shows '-'
        key = f"{path}_{n}"
        return f"{acc[key]:>15.4f}" if key in acc else f"{'-':>15}"

    def latency_cells(v: dict[str, float], n: str) -> str:
        if n not in v:
            return f"{'-':>18}{'-':>10}"
        return f"{v[n]:>18.3f}{v['speedup_' + n]:>9.2f}x"

    print(f"{'top-1':<10}{'fp32':>10}" + "".join(f"{n:>15}" for n in names))
    for path in ("eager", *(["eager_gemm"] if args.gemm_layout else []), *runners):
        row = f"{path:<14}{acc[f'{path}_fp32']:>10.4f}"
        print(row + "".join(acc_cell(path, n) for n in names))
    print(f"{'latency':<20}{'fp32 ms':>10}" + "".join(f"{n + ' ms':>18}{'speed-up':>10}"
                                                   for n in names))  # fmt: skip
    for key, v in res["latency_ms"].items():
        print(f"{key:<20}{v['fp32']:>10.3f}" + "".join(latency_cells(v, n) for n in names))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
