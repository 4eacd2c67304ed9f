"""Foundation benchmarks: accuracy runs, loader cost, roofline estimate vs measured latency.

Writes one JSON file of results (``--out``, atomically) and prints a short table per part. Run:

    python scripts/bench_foundation.py --part roofline --device cpu --threads 2 --out r.json
    python scripts/bench_foundation.py --part all --device cuda --out gpu.json   # on a GPU

Parts:
  accuracy  resnet20 on Fashion-MNIST and lenet5 on MNIST through the training job the CLI uses.
  loader    training images/s of resnet20 with the device-resident loader vs synthetic batches
            already on the device (same model, optimiser and step): the loader's share of a step.
  roofline  resnet20 and vgg11-bn at batch 1 and 256: measured latency here vs the roofline
            estimate on the matching profile (h100-sxm on an H100, the measured cpu profile on CPU).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _bench_common import command_line, positive_int

from slimtorch.cli.common import format_table
from slimtorch.core.devices import detect_devices, resolve_device, synchronize
from slimtorch.core.io import atomic_write_json
from slimtorch.core.measure import estimate_latency, measure_latency
from slimtorch.core.profiles import get_profile, list_profiles
from slimtorch.data import DeviceLoader, SyntheticLoader, load_dataset
from slimtorch.models import create_model
from slimtorch.train import TrainConfig, resolve_amp
from slimtorch.train.classifier import default_augment, train_classifier


def part_accuracy(
    device: torch.device, out_dir: Path, quick: bool, command: str
) -> list[dict[str, Any]]:
    """Train each model; every row records ``command``, the command line that produced it."""
    runs = [
        ("resnet20", "fashion-mnist", 2 if quick else 30, 0.1),
        ("lenet5", "mnist", 1 if quick else 20, 0.05),
    ]
    rows = []
    for model, dataset, epochs, lr in runs:
        cfg = TrainConfig(epochs=epochs, lr=lr, weight_decay=5e-4, amp="auto", progress=False)
        res = train_classifier(
            model=model,
            dataset=dataset,
            out_dir=out_dir / f"{model}-{dataset}",
            train_config=cfg,
            batch_size=128,
            device=device,
            download=False,
        )
        rows.append(
            {
                "model": model,
                "dataset": dataset,
                "epochs": epochs,
                "batch_size": 128,
                "lr": lr,
                "amp": "auto",
                "test_accuracy": res.test_metrics["accuracy"],
                "train_seconds": res.train_seconds,
                "command": command,
            }
        )
        logging.info("accuracy %s", rows[-1])
    return rows


def _train_throughput(loader: Any, device: torch.device, steps: int) -> float:
    model = create_model("resnet20", num_classes=10, in_channels=1, input_size=28).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    amp = resolve_amp("auto", device)  # bf16 only where the GPU computes in it natively
    scaler = amp.make_scaler(device)
    it = iter(loader)

    def step() -> int:
        nonlocal it
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            x, y = next(it)
        with amp.autocast(device):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return x.shape[0]

    for _ in range(10):
        step()
    synchronize(device)
    t0 = time.perf_counter()
    n = sum(step() for _ in range(steps))
    synchronize(device)
    return n / (time.perf_counter() - t0)


def part_loader(device: torch.device, quick: bool) -> list[dict[str, Any]]:
    ds = load_dataset("fashion-mnist", "train", download=False)
    rows = []
    for batch in (128, 512):
        real = DeviceLoader(
            ds,
            batch,
            shuffle=True,
            drop_last=True,
            device=device,
            augment=default_augment("fashion-mnist"),
        )
        synth = SyntheticLoader(
            ds.input_shape, batch, len(real), device=device, num_classes=len(ds.classes)
        )
        steps = 20 if quick else 200
        # interleave and repeat so that drift on a shared machine hits both alike
        r, s = [], []
        for _ in range(3):
            r.append(_train_throughput(real, device, steps))
            s.append(_train_throughput(synth, device, steps))
        real_ips, synth_ips = max(r), max(s)
        rows.append(
            {
                "batch_size": batch,
                "loader_images_per_s": real_ips,
                "synthetic_images_per_s": synth_ips,
                "loader_share_of_step": 1.0 - real_ips / synth_ips,
            }
        )
        logging.info("loader %s", rows[-1])
    return rows


def part_roofline(
    device: torch.device, threads: int | None, quick: bool, profile_name: str | None = None
) -> list[dict[str, Any]]:
    profile = get_profile(profile_name or ("h100-sxm" if device.type == "cuda" else "cpu"))
    rows = []
    for name, shape in (("resnet20", (1, 28, 28)), ("vgg11-bn", (3, 32, 32))):
        model = create_model(name, num_classes=10, in_channels=shape[0], input_size=shape[1])
        model = model.to(device).eval()
        for batch in (1, 256):
            x = torch.randn(batch, *shape, device=device)
            lat = measure_latency(
                model, x, device=device, threads=threads, repeats=10 if quick else 50
            )
            est = estimate_latency(model, x, profile)
            compute = sum(r.compute_s for r in est.rows)
            memory = sum(r.memory_s for r in est.rows)
            launch = sum(r.overhead_s for r in est.rows)
            rows.append(
                {
                    "model": name,
                    "input": list(shape),
                    "batch_size": batch,
                    "profile": profile.name,
                    "measured_ms": lat.median_s * 1e3,
                    "measured_p10_ms": lat.p10_s * 1e3,
                    "measured_p90_ms": lat.p90_s * 1e3,
                    "estimated_ms": est.total_s * 1e3,
                    "measured_over_estimate": lat.median_s / est.total_s,
                    "est_compute_ms": compute * 1e3,
                    "est_memory_ms": memory * 1e3,
                    "est_launch_ms": launch * 1e3,
                    "kernels": sum(r.kernels for r in est.rows),
                }
            )
            logging.info("roofline %s", rows[-1])
    return rows


def print_tables(result: dict[str, Any]) -> None:
    """One short table per part that ran."""
    if "roofline" in result:
        print("roofline: measured vs estimated latency")
        rows = [[r["model"], r["batch_size"], r["profile"], f"{r['measured_ms']:.3f}",
                 f"{r['estimated_ms']:.3f}", f"{r['measured_over_estimate']:.2f}"]
                for r in result["roofline"]]  # fmt: skip
        hdr = ["model", "batch", "profile", "measured ms", "estimated ms", "measured/est"]
        print(format_table(hdr, rows) + "\n")
    if "loader" in result:
        print("loader: training images/s, device loader vs synthetic batches")
        rows = [[r["batch_size"], f"{r['loader_images_per_s']:.0f}",
                 f"{r['synthetic_images_per_s']:.0f}", f"{100 * r['loader_share_of_step']:.1f}%"]
                for r in result["loader"]]  # fmt: skip
        print(format_table(["batch", "loader img/s", "synthetic img/s", "loader share"], rows))
        print()
    if "accuracy" in result:
        print("accuracy: test top-1 after training")
        rows = [[r["model"], r["dataset"], r["epochs"], f"{100 * r['test_accuracy']:.2f}%",
                 f"{r['train_seconds']:.0f}"] for r in result["accuracy"]]  # fmt: skip
        print(format_table(["model", "dataset", "epochs", "test top-1", "train s"], rows))
        print()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--part", choices=("accuracy", "loader", "roofline", "all"), default="all")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    ap.add_argument(
        "--profile",
        default=None,
        choices=list_profiles(),
        help="device profile the roofline part estimates on (default: h100-sxm on a GPU, cpu "
        "on the CPU); name the profile of the GPU at hand, e.g. rx580 or gtx1060-6gb",
    )
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs-dir", default="runs/bench")
    ap.add_argument("--quick", action="store_true", help="tiny settings to check the script runs")
    args = ap.parse_args(argv)
    command = command_line("scripts/bench_foundation.py", argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    info = next(
        d
        for d in detect_devices()
        if d.device == str(device) or (device.type == "cpu" and d.kind == "cpu")
    )
    result: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "device": info.name,
        "device_kind": info.kind,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "command": command,
    }
    parts = ("accuracy", "loader", "roofline") if args.part == "all" else (args.part,)
    if "roofline" in parts:
        result["roofline"] = part_roofline(device, args.threads, args.quick, args.profile)
    if "loader" in parts:
        result["loader"] = part_loader(device, args.quick)
    if "accuracy" in parts:
        result["accuracy"] = part_accuracy(device, Path(args.runs_dir), args.quick, command)
    atomic_write_json(args.out, result)
    print_tables(result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
