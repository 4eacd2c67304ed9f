"""Benchmark static int8 PTQ on the CPU: accuracy, weight bytes and latency, two runtimes.

For one model (a trained model directory, or a fresh zoo model) on Fashion-MNIST:

- PyTorch path: the fp32 model and the Q/DQ int8 model, both compiled with
  ``slimtorch.quant.runtime.compile_int8_x86`` (inductor + freezing; int8 runs oneDNN qconv).
- ONNX Runtime path: fp32 ONNX vs int8 Q/DQ ONNX (``export_onnx``), CPU provider.

Latency is the median of ``measure_latency`` at fixed threads, fp32 and int8 timed alternately
(``--rounds`` times, the best median kept) so that drift on a shared machine hits both alike.
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
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtorch.core.io import atomic_write_json
from slimtorch.core.measure import measure_latency
from slimtorch.data import load_dataset
from slimtorch.models import create_model, load_model
from slimtorch.quant.convert import state_bytes
from slimtorch.quant.export import export_onnx, ort_int8_ops, ort_session, run_onnx
from slimtorch.quant.ptq import PTQConfig, quantize_
from slimtorch.quant.runtime import compile_int8_x86, cpu_int8_support, int8_kernels

logger = logging.getLogger("bench_quant")


def _data(root: str | None, mean: float, std: float, n_test: int) -> tuple[Any, ...]:
    train = load_dataset("fashion-mnist", "train", root=root, download=False)
    test = load_dataset("fashion-mnist", "test", root=root, download=False)

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


def _latency(pairs: dict[str, Any], x: torch.Tensor, threads: int, rounds: int) -> dict[str, float]:
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, fn in pairs.items():
            r = measure_latency(lambda fn=fn: fn(x), threads=threads, warmup=5, min_time_s=0.5)
            best[name] = min(best.get(name, float("inf")), r.median_s)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-dir", help="a slimtorch model directory (trained model)")
    src.add_argument("--model", help="a zoo model name, freshly initialised (timing only)")
    p.add_argument("--data", default=None, help="folder holding fashion-mnist/ (SLIMTORCH_DATA)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", default="1,32", help="batch sizes to time, comma-separated")
    p.add_argument("--calibration-batches", type=int, default=16)
    p.add_argument("--calibration-batch-size", type=int, default=64)
    p.add_argument("--observer", default="minmax", choices=["minmax", "percentile", "mse"])
    p.add_argument("--test-samples", type=int, default=10000)
    p.add_argument("--rounds", type=int, default=3, help="alternating timing rounds")
    p.add_argument("--skip-onnx", action="store_true")
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--out", default="bench_quant.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    if args.model_dir:
        model, card = load_model(args.model_dir)
        mean, std, name = card.mean[0], card.std[0], args.model_dir
    else:
        model = create_model(args.model, num_classes=10, in_channels=1, input_size=28).eval()
        mean, std, name = 0.286, 0.353, args.model
    root = str(Path(args.data) / "fashion-mnist") if args.data else None
    xtr, _, xte, yte = _data(root, mean, std, args.test_samples)
    perm = torch.randperm(len(xtr))[: args.calibration_batches * args.calibration_batch_size]
    calib = list(xtr[perm].split(args.calibration_batch_size))

    fp32 = model.eval()
    int8 = copy.deepcopy(fp32)
    t0 = time.perf_counter()
    report = quantize_(int8, PTQConfig(mode="static", observer=args.observer), calibration=calib)
    ptq_s = time.perf_counter() - t0
    batches = [int(b) for b in args.batches.split(",")]
    res: dict[str, Any] = {
        "model": name,
        "device": platform.processor() or platform.machine(),
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
    if not args.skip_compile:
        res["int8_kernels_pytorch"] = int8_kernels(int8, xte[:1])
        runners["pytorch"] = {"fp32": compile_int8_x86(fp32), "int8": compile_int8_x86(int8)}
        res["accuracy"]["pytorch_fp32"] = _accuracy(runners["pytorch"]["fp32"], xte, yte)
        res["accuracy"]["pytorch_int8"] = _accuracy(runners["pytorch"]["int8"], xte, yte)
    if not args.skip_onnx:
        out_dir = Path(args.out).with_suffix("")
        f_path = export_onnx(fp32, out_dir / "fp32.onnx", xte[:1])
        q_path = export_onnx(int8, out_dir / "int8.onnx", xte[:1])
        res["int8_kernels_ort"] = ort_int8_ops(q_path)
        sess = {k: ort_session(v, args.threads) for k, v in (("fp32", f_path), ("int8", q_path))}
        runners["ort"] = {k: (lambda x, s=s: run_onnx(s, x)) for k, s in sess.items()}
        res["accuracy"]["ort_fp32"] = _accuracy(runners["ort"]["fp32"], xte, yte)
        res["accuracy"]["ort_int8"] = _accuracy(runners["ort"]["int8"], xte, yte)
    for path, fns in runners.items():
        for b in batches:
            x = xte[:b].contiguous()
            t = _latency(fns, x, args.threads, args.rounds)
            res["latency_ms"][f"{path}/b{b}"] = {
                "fp32": t["fp32"] * 1e3, "int8": t["int8"] * 1e3, "speedup": t["fp32"] / t["int8"],
            }  # fmt: skip
    res["report"] = report.to_dict()
    atomic_write_json(args.out, res)

    acc = res["accuracy"]
    print(f"model {name}  threads {args.threads}  cpu {res['cpu_int8']}")
    wb = res["weight_bytes"]
    print(f"weight bytes  fp32 {wb['fp32']:,}  int8 {wb['int8']:,}  ({wb['ratio']:.2f}x smaller)")
    print(f"{'path':<10}{'acc fp32':>10}{'acc int8':>10}{'drop (pt)':>11}")
    for path in ("eager", *runners):
        a, b = acc[f"{path}_fp32"], acc[f"{path}_int8"]
        print(f"{path:<10}{a:>10.4f}{b:>10.4f}{(a - b) * 100:>11.2f}")
    print(f"{'latency':<14}{'fp32 ms':>10}{'int8 ms':>10}{'speed-up':>10}")
    for key, v in res["latency_ms"].items():
        print(f"{key:<14}{v['fp32']:>10.3f}{v['int8']:>10.3f}{v['speedup']:>9.2f}x")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
