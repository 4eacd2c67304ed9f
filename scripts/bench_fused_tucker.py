"""A factorised model: dense vs Tucker-2 as library convolutions vs the fused kernel.

For a dense base model and factorised models made from it (``slimtorch compress --method
tucker``), times side by side (interleaved rounds, median of each round's median) at fixed
threads on the CPU, or on a CUDA GPU (``--device cuda``):

- ``dense``: the base model, eager, NCHW;
- ``dense-folded-cl``: batch norms folded, channels-last, eager (and ``+compile``);
- ``tucker-cl``: the factorised model as three library convolutions per layer, channels-last
  (and ``+compile``);
- ``fused``: the factorised model after ``fuse_tucker_`` (and ``fold_bn_`` for the layers left
  dense), NCHW, eager (and ``+compile``).

With ``--graphs`` (CUDA) the dense-folded-cl and fused forms, compiled or not, are also timed
replayed as CUDA graphs (``+graph``), which takes the host's launch cost out at small batches.
Speed-ups are given against the fastest dense form measured. Test accuracy of the base, the
factorised and the fused model is measured on the full test set, so the fused form is shown to
compute the same model.

    taskset -c 1 python scripts/bench_fused_tucker.py --base runs/resnet56/model \\
        --compressed runs/resnet56-tucker/model --data ../shared/data --threads 1 --compile \\
        --out results.json
    python scripts/bench_fused_tucker.py --device cuda --compile --graphs \\
        --batches 1,16,64,256,1024,2048,4096 --rounds 3 ... --out results.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _bench_common import card_dataset, cpu_name, model_dir_type, positive_int, positive_ints
from torch import nn

from slimtorch.core.io import atomic_write_json
from slimtorch.core.measure import count_flops, count_params, measure_latency
from slimtorch.core.measure.graphs import GraphedForward
from slimtorch.data import load_dataset
from slimtorch.decompose import fuse_tucker_, kernel_status
from slimtorch.decompose.cuda_kernel import cuda_status
from slimtorch.models import load_model
from slimtorch.quant import fold_bn_


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    device = next(model.parameters()).device
    images, labels = images.to(device), labels.to(device)
    with torch.inference_mode():
        pred = torch.cat([model(x).argmax(1) for x in images.split(500)])
    return float((pred == labels).float().mean())


def variants(
    base: nn.Module, comp: nn.Module, compiled: bool, graphs: bool = False
) -> dict[str, tuple[nn.Module, bool]]:
    """name -> (model, channels_last input); models on ``base``'s device."""
    folded = copy.deepcopy(base)
    fold_bn_(folded)
    tucker = copy.deepcopy(comp)
    fused = copy.deepcopy(comp)
    fuse_tucker_(fused)
    fold_bn_(fused)  # the layers left dense (stem, shortcuts)
    out: dict[str, tuple[nn.Module, bool]] = {
        "dense": (base, False),
        "dense-folded-cl": (folded.to(memory_format=torch.channels_last), True),  # type: ignore[call-overload]
        "tucker-cl": (tucker.to(memory_format=torch.channels_last), True),  # type: ignore[call-overload]
        "fused": (fused, False),
    }
    if compiled:
        torch._dynamo.reset()  # the previous models' graphs would count against the limit
        # the forms share their forward's code and each batch size is one more graph: room for
        # every form at every batch, or later ones silently run eagerly
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        for name in ("dense-folded-cl", "tucker-cl", "fused"):
            model, cl = out[name]
            out[name + "+compile"] = (torch.compile(model, dynamic=False), cl)  # type: ignore[assignment]
    if graphs:
        for name in [k for k in out if k.startswith(("dense-folded-cl", "fused"))]:
            model, cl = out[name]
            out[name + "+graph"] = (GraphedForward(model), cl)  # type: ignore[assignment]
    return out


def time_all(
    models: dict[str, tuple[nn.Module, bool]], x: torch.Tensor, threads: int, rounds: int
) -> dict[str, float]:
    """Median over rounds of each model's median latency (seconds), models interleaved."""
    xcl = x.contiguous(memory_format=torch.channels_last)
    samples: dict[str, list[float]] = {k: [] for k in models}
    on_cpu = x.device.type == "cpu"
    for _ in range(rounds):
        for name, (model, cl) in models.items():
            r = measure_latency(
                model, xcl if cl else x, device=x.device, threads=threads if on_cpu else None,
                repeats=5, min_time_s=0.1 if on_cpu else 0.05,
            )  # fmt: skip
            samples[name].append(r.median_s)
    return {k: statistics.median(v) for k, v in samples.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--base",
        required=True,
        type=model_dir_type("--base"),
        help="dense model directory (or the run directory holding it in model/)",
    )
    ap.add_argument(
        "--compressed",
        action="append",
        required=True,
        type=model_dir_type("--compressed"),
        help="factorised model directory (or its run directory); repeat for several",
    )
    ap.add_argument("--data", required=True, help="folder holding <dataset>/")
    ap.add_argument(
        "--dataset",
        default=None,
        help="dataset to evaluate on (default: the base model card's, else fashion-mnist)",
    )
    ap.add_argument("--threads", type=positive_int, default=1)
    ap.add_argument("--batches", type=positive_ints, default=[1, 32])
    ap.add_argument("--rounds", type=positive_int, default=7)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd forms")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--graphs", action="store_true", help="also time CUDA-graph forms (CUDA)")
    ap.add_argument("--test-images", type=int, default=0, help="first N test images (0: all)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type not in ("cpu", "cuda"):
        ap.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.graphs and device.type != "cuda":
        ap.error("--graphs needs --device cuda")
    base, card = load_model(args.base)
    base.eval().to(device)
    dataset = card_dataset(card, args.dataset)
    test = load_dataset(dataset, "test", root=str(Path(args.data) / dataset), download=False)
    images = (test.images.float() / 255 - card.mean[0]) / card.std[0]
    labels = test.labels.long()
    if args.test_images > 0:
        images, labels = images[: args.test_images], labels[: args.test_images]
    shape = tuple(images.shape[1:])
    example = images[:1].to(device)
    kernel = kernel_status().detail if device.type == "cpu" else cuda_status()
    res: dict[str, Any] = {
        "command": " ".join([sys.executable, *sys.argv]),
        "device": (cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device)),
        "torch": torch.__version__,
        "threads": args.threads,
        "date": time.strftime("%Y-%m-%d"),
        "dataset": dataset,
        "test_images": len(labels),
        "kernel": kernel,
        "base": {
            "dir": str(args.base),
            "accuracy": accuracy(base, images, labels),
            "params": count_params(base),
            "flops": count_flops(base, example).total_flops,
        },
        "compressed": [],
    }
    print(f"kernel: {kernel}")
    for comp_dir in args.compressed:
        comp, _ = load_model(comp_dir)
        comp.eval().to(device)
        models = variants(base, comp, args.compile, args.graphs)
        fused = models["fused"][0]
        entry: dict[str, Any] = {
            "dir": str(comp_dir),
            "accuracy": accuracy(comp, images, labels),
            "accuracy_fused": accuracy(fused, images, labels),
            "params": count_params(comp),
            "flops": count_flops(comp, example).total_flops,
            "latency_ms": {},
        }
        print(
            f"{comp_dir}: top-1 {entry['accuracy']:.4f} (fused {entry['accuracy_fused']:.4f}), "
            f"FLOPs /{res['base']['flops'] / entry['flops']:.2f}"
        )
        for b in args.batches:
            x = torch.randn(b, *shape, device=device)
            ms = {k: v * 1e3 for k, v in time_all(models, x, args.threads, args.rounds).items()}
            best_dense = min(v for k, v in ms.items() if k.startswith("dense"))
            entry["latency_ms"][f"b{b}"] = {
                "ms": ms,
                "speedup_vs_best_dense": {k: best_dense / v for k, v in ms.items()},
            }
            print(
                f"  batch {b}: "
                + " | ".join(f"{k} {v:.2f} ms ({best_dense / v:.2f}x)" for k, v in ms.items())
            )
        res["compressed"].append(entry)
    atomic_write_json(args.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
