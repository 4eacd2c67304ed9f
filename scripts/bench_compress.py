"""Compression that pays: decompose trained models, fine-tune, measure speed side by side.

For each base model (a slimtorch model directory, trained with ``slimtorch train``) and each
plan (method, rank spec, the device and batch the per-layer speed check runs on):
decompose_ with ``min_speedup`` so that a layer is only factorised where it is measured faster
on that device, fine-tune on the training device, then report test accuracy, params, FLOPs
and latency of base and compressed models measured side by side (interleaved) on the CPU
(fixed threads) and on the GPU over a batch curve, eager and torch.compile, with the FLOP
ratio beside each speed-up. A ``tt`` part compresses the hidden layers of an MLP
(784-1024-1024-10) on MNIST in the TT-matrix format.

A plan is ``method@rank@device@batch``: method tucker, cp or tt; a rank as ``slimtorch compress
--rank`` takes it (``0.25`` a fraction, ``16`` an integer rank, ``vbmf``, ``energy:0.9``,
``budget:params=0.3``); the device the speed check runs on (cpu, cuda or cuda:N); the batch it
times, or several joined by ``+`` (``1+32``).

    python scripts/bench_compress.py --base runs/resnet56 --plans tucker@budget:params=0.3@cpu@32 \
        --finetune-epochs 1 --cpu-batches 1 --rounds 1 --out results.json
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import logging
import re
import sys
import time
from typing import Any

import torch
import torch._dynamo
from _bench_common import cpu_name, model_dir_type, positive_int, positive_ints
from torch import nn

from slimtorch.cli.compress_cmd import rank_arg
from slimtorch.core.io import atomic_write_json
from slimtorch.core.measure import count_flops, count_params, estimate_latency, measure_latency
from slimtorch.data import DeviceLoader, load_dataset
from slimtorch.decompose import CPConfig, TTConfig, TuckerConfig, decompose_
from slimtorch.decompose.ranks import parse_rank_spec
from slimtorch.models import load_model
from slimtorch.quant import lower_direct_conv_
from slimtorch.train import TrainConfig, Trainer
from slimtorch.train.classifier import default_augment, train_classifier

log = logging.getLogger("bench_compress")
CONFIGS = {"tucker": TuckerConfig, "cp": CPConfig, "tt": TTConfig}
PLAN_DEVICES = "cpu, cuda or cuda:N"


def parse_plan(plan: str) -> dict[str, Any]:
    """``method@rank@device@batch`` as a dict (``method``, ``rank`` as written, ``rank_value``
    as the method's config takes it, ``device``, ``batches``); ``ValueError`` names the part
    that is wrong and what is accepted.

    The rank is read as ``slimtorch compress --rank`` reads it: ``"16"`` is the integer rank
    16, ``"0.5"`` the fraction 0.5, anything else a rank string (``vbmf``, ``energy:0.9``,
    ``budget:params=0.3``).
    """
    parts = plan.split("@")
    if len(parts) != 4:
        raise ValueError(
            f"plan {plan!r} must have four @-separated parts method@rank@device@batch "
            "(e.g. tucker@0.25@cpu@32)"
        )
    method, rank, device, batch = (p.strip() for p in parts)
    if method not in CONFIGS:
        raise ValueError(f"plan {plan!r}: method {method!r} is not one of {', '.join(CONFIGS)}")
    rank_value = rank_arg(rank)
    cfg = CONFIGS[method]
    try:
        parse_rank_spec(rank_value, field=f"{cfg.__name__}.rank", allowed=cfg.RANK_KINDS)
    except ValueError as exc:
        raise ValueError(f"plan {plan!r}: {exc}") from None
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ValueError(f"plan {plan!r}: device {device!r} is not one of {PLAN_DEVICES}")
    try:
        batches = [int(b) for b in batch.split("+")]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise ValueError(
            f"plan {plan!r}: batch {batch!r} must be an integer >= 1, or several joined by + (1+32)"
        )
    return {"method": method, "rank": rank, "rank_value": rank_value, "device": device,
            "batches": batches}  # fmt: skip


def accuracy(model: nn.Module, ds: Any, device: torch.device) -> float:
    loader = DeviceLoader(ds, 1024, device=device)
    model.to(device).eval()
    res = Trainer(model, TrainConfig(epochs=1, progress=False), device=device).evaluate(loader)
    return float(res["accuracy"])


def finetune(model: nn.Module, name: str, device: torch.device, epochs: int, lr: float) -> None:
    if epochs <= 0:
        return
    ds = load_dataset(name, "train", download=False)
    loader = DeviceLoader(
        ds, 256, shuffle=True, drop_last=True, device=device, augment=default_augment(name)
    )
    cfg = TrainConfig(epochs=epochs, lr=lr, weight_decay=5e-4, amp="auto", progress=False)
    Trainer(model.to(device), cfg, device=device).fit(loader)


def side_by_side(
    a: nn.Module, b: nn.Module, x: torch.Tensor, threads: int | None, rounds: int
) -> tuple[float, float]:
    """Median latency of a and b, measured in alternating rounds (ABAB) on x's device."""
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(measure_latency(a, x, threads=threads, repeats=5, min_time_s=0.05).median_s)
        tb.append(measure_latency(b, x, threads=threads, repeats=5, min_time_s=0.05).median_s)
    ta.sort()
    tb.sort()
    return ta[len(ta) // 2], tb[len(tb) // 2]


def speed_rows(
    base: nn.Module,
    comp: nn.Module,
    shape: tuple[int, ...],
    device: torch.device,
    batches: list[int],
    threads: int | None,
    compiled: bool,
    rounds: int,
    flop_ratio: float,
    channels_last: bool = False,
) -> list[dict[str, Any]]:
    rows = []
    a = copy.deepcopy(base).to(device).eval()
    b = copy.deepcopy(comp).to(device).eval()
    if channels_last:
        a = a.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        b = b.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if compiled:
        mode = COMPILE_MODE[0]
        torch._dynamo.reset()  # earlier pairs' graphs would count against the recompile limit
        # static shapes: one graph per batch size (after a second size, dynamo would otherwise
        # switch to a dynamic-shape graph whose kernels are slower)
        # both models' forwards share code objects: room for every batch size of both
        torch._dynamo.config.recompile_limit = max(
            torch._dynamo.config.recompile_limit, 2 * len(batches) + 2
        )
        a = torch.compile(a, mode=mode, dynamic=False)
        b = torch.compile(b, mode=mode, dynamic=False)
    for batch in batches:
        x = torch.randn(batch, *shape, device=device)
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            try:
                t_a, t_b = side_by_side(a, b, x, threads, rounds)
            except torch.OutOfMemoryError:
                log.warning("out of memory at batch %d on %s; curve stops here", batch, device)
                torch.cuda.empty_cache()
                break
        rows.append(
            {
                "device": str(device),
                "compiled": compiled and (COMPILE_MODE[0] or "default"),
                "channels_last": channels_last,
                "batch": batch,
                "base_ms": t_a * 1e3,
                "compressed_ms": t_b * 1e3,
                "speedup": t_a / t_b,
                "flop_ratio": flop_ratio,
            }
        )
        log.info("speed %s", rows[-1])
    return rows


COMPILE_MODE: list[str | None] = [None]


def run_plan(
    base: nn.Module, card: Any, plan: str, args: argparse.Namespace, gpu: torch.device | None
) -> dict[str, Any]:
    parsed = parse_plan(plan)
    method, rank, plan_dev = parsed["method"], parsed["rank"], parsed["device"]
    shape = tuple(card.input_shape)
    name = card.extra["dataset"]
    test = load_dataset(name, "test", download=False)
    train_dev = gpu or torch.device("cpu")
    speed_dev = torch.device(plan_dev)
    comp = copy.deepcopy(base).to(speed_dev).eval()
    opts: dict[str, Any] = {"rank": parsed["rank_value"], "round_to": args.round_to}
    batches = parsed["batches"]
    if args.min_speedup > 0:
        opts.update(
            min_speedup=args.min_speedup,
            speed_batch=batches[0] if len(batches) == 1 else batches,
            speed_channels_last=args.channels_last,
            speed_scope=args.speed_scope,
            speed_compile=args.speed_compile,
        )
    cfg = CONFIGS[method].from_dict(opts)
    x = torch.randn(batches[0], *shape, device=speed_dev)
    t0 = time.perf_counter()
    if speed_dev.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    report = decompose_(comp, cfg, example_input=x, include=args.include)
    torch.set_num_threads(args.host_threads)
    dec_s = time.perf_counter() - t0
    log.info("%s\n%s", plan, report.to_table())
    acc_dec = accuracy(comp, test, train_dev)
    finetune(comp, name, train_dev, args.finetune_epochs, args.lr)
    acc_ft = accuracy(comp, test, train_dev)
    comp = comp.cpu().eval()
    base_c = copy.deepcopy(base).cpu().eval()
    one = torch.randn(1, *shape)
    f0, f1 = count_flops(base_c, one).total_flops, count_flops(comp, one).total_flops
    p0, p1 = count_params(base_c), count_params(comp)
    xs = torch.randn(32, *shape)
    rx0 = estimate_latency(base_c, xs, "rx580").total_s
    rx1 = estimate_latency(comp, xs, "rx580").total_s
    cpu = torch.device("cpu")
    curves: list[tuple[torch.device, list[int], int | None, bool]] = [
        (cpu, args.cpu_batches, args.threads, False)
    ]
    if args.cpu_compile:
        curves.append((cpu, args.cpu_batches, args.threads, True))
    if gpu is not None:
        curves.append((gpu, args.gpu_batches, None, False))
        if args.compile_batches:
            curves.append((gpu, args.compile_batches, None, True))
    speeds = []
    for device, curve_batches, threads, compiled in curves:
        speeds += speed_rows(
            base_c, comp, shape, device, curve_batches, threads, compiled, args.rounds,
            f0 / f1, args.channels_last,
        )  # fmt: skip
    lowered = lowered_stem(base_c, comp, shape, args, gpu, test, train_dev, f0 / f1)
    done = [r for r in report.rows if r.action == "decomposed"]
    return {
        "plan": plan,
        "method": method,
        "rank": rank,
        "plan_device": plan_dev,
        "plan_batch": batches,
        "include": args.include,
        "min_speedup": args.min_speedup,
        "speed_scope": args.speed_scope,
        "speed_compile": args.speed_compile,
        "layers_decomposed": len(done),
        "layers_targeted": len(report.rows),
        "decompose_s": dec_s,
        "accuracy_after_decompose": acc_dec,
        "accuracy": acc_ft,
        "params": [p0, p1],
        "params_ratio": p0 / p1,
        "flops": [f0, f1],
        "flop_ratio": f0 / f1,
        "rx580_est_ms_b32": [rx0 * 1e3, rx1 * 1e3],
        "speed": speeds,
        "layers": report.to_dict()["layers"],
        "lowered_stem": lowered,
    }


def lowered_stem(
    base: nn.Module,
    comp: nn.Module,
    shape: tuple[int, ...],
    args: argparse.Namespace,
    gpu: torch.device | None,
    test: Any,
    train_dev: torch.device,
    flop_ratio: float,
) -> dict[str, Any] | None:
    """Both models with their stems lowered (lower_direct_conv_), timed compiled on the GPU:
    the compressed model against the lowered dense one, and the lowering alone."""
    if not args.lower_stem:
        return None
    base_l, comp_l = copy.deepcopy(base).eval(), copy.deepcopy(comp).eval()
    rows = [r.conv for r in lower_direct_conv_(base_l).lowered]
    lower_direct_conv_(comp_l)
    x = torch.randn(16, *shape)
    with torch.no_grad():
        diff = max(
            float((base_l(x) - base(x)).abs().max()), float((comp_l(x) - comp(x)).abs().max())
        )
    out: dict[str, Any] = {
        "lowered": rows,
        "max_abs_diff": diff,
        "accuracy": accuracy(comp_l, test, train_dev),
    }
    if gpu is not None and args.compile_batches:
        bs = args.compile_batches
        out["speed"] = speed_rows(
            base_l, comp_l, shape, gpu, bs, None, True, args.rounds, flop_ratio
        )
        out["lowering_alone"] = speed_rows(
            base, base_l, shape, gpu, bs, None, True, args.rounds, 1.0
        )
    return out


def part_tt(args: argparse.Namespace, gpu: torch.device | None) -> dict[str, Any]:
    dev = gpu or torch.device("cpu")
    cfg = TrainConfig(epochs=args.tt_epochs, lr=0.05, weight_decay=5e-4, progress=False)
    run = train_classifier(
        model="mlp",
        dataset="mnist",
        out_dir=None,
        train_config=cfg,
        batch_size=128,
        device=dev,
        model_kwargs={"hidden": [1024, 1024]},
        download=False,
    )
    model = run.model
    test = load_dataset("mnist", "test", download=False)
    acc0 = accuracy(model, test, dev)
    report = decompose_(model, TTConfig(rank=args.tt_rank), include=["features.1", "features.3"])
    hidden0 = sum(r.params_before for r in report.rows)
    hidden1 = sum(r.params_after for r in report.rows)
    acc_dec = accuracy(model, test, dev)
    finetune(model, "mnist", dev, args.tt_finetune_epochs, args.tt_lr)
    acc1 = accuracy(model, test, dev)
    return {
        "model": "mlp 784-1024-1024-10",
        "dataset": "mnist",
        "tt_rank": args.tt_rank,
        "base_epochs": args.tt_epochs,
        "finetune_epochs": args.tt_finetune_epochs,
        "accuracy_before": acc0,
        "accuracy_after_decompose": acc_dec,
        "accuracy": acc1,
        "hidden_params": [hidden0, hidden1],
        "hidden_params_ratio": hidden0 / hidden1,
        "layers": report.to_dict()["layers"],
    }


def ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--base",
        action="append",
        type=model_dir_type("--base"),
        default=[],
        help="base model directory, or the run directory holding it in model/",
    )
    ap.add_argument(
        "--plans",
        default="tucker@budget:params=0.3@cpu@32",
        help="semicolon-separated method@rank@device@batch: rank 16 is an integer rank, 0.25 a "
        "fraction (a rank may hold commas: budget:params=0.3,flops=0.4); device cpu, cuda or "
        "cuda:N; batch 32 or 1+32",
    )
    ap.add_argument(
        "--include",
        type=lambda t: [g for g in t.split(",") if g],
        default=None,
        help="comma-separated layer-name globs the plans may factorise (default: all)",
    )
    ap.add_argument("--min-speedup", type=float, default=1.05)
    ap.add_argument(
        "--speed-scope",
        choices=("layer", "model"),
        default="layer",
        help="gate each factorised layer alone or by timing the whole model with and without it",
    )
    ap.add_argument(
        "--speed-compile", action="store_true", help="with --speed-scope model: time compiled"
    )
    ap.add_argument("--round-to", type=int, default=1)
    ap.add_argument("--finetune-epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--threads", type=positive_int, default=2, help="CPU threads for CPU timings")
    ap.add_argument("--cpu-batches", type=positive_ints, default=[1, 32])
    ap.add_argument("--gpu-batches", type=positive_ints, default=[1, 16, 64, 256, 1024, 4096])
    ap.add_argument("--compile-batches", type=ints, default=[])
    ap.add_argument(
        "--cpu-compile",
        action="store_true",
        help="also time both models under torch.compile on the CPU at --cpu-batches",
    )
    ap.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile mode for --compile-batches (e.g. reduce-overhead: CUDA graphs)",
    )
    ap.add_argument("--rounds", type=positive_int, default=5)
    ap.add_argument(
        "--channels-last",
        action="store_true",
        help="gate layers and time both models in channels-last (NHWC) layout",
    )
    ap.add_argument(
        "--lower-stem",
        action="store_true",
        help="also time both models compiled with their stems lowered (lower_direct_conv_)",
    )
    ap.add_argument("--tt", action="store_true", help="also run the TT MLP part")
    ap.add_argument("--tt-rank", type=int, default=12)
    ap.add_argument("--tt-epochs", type=int, default=15)
    ap.add_argument("--tt-finetune-epochs", type=int, default=10)
    ap.add_argument("--tt-lr", type=float, default=0.05)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    plans = [p for p in args.plans.split(";") if p.strip()]
    if not plans and args.base:
        ap.error("--plans is empty; give at least one method@rank@device@batch")
    for plan in plans:
        try:
            dev = parse_plan(plan)["device"]
        except ValueError as exc:
            ap.error(f"--plans: {exc}")
        if dev.startswith("cuda") and not torch.cuda.is_available():
            ap.error(f"--plans: plan {plan!r} runs its speed check on {dev}, but no CUDA GPU "
                     "is available here; use cpu")  # fmt: skip
    COMPILE_MODE[0] = args.compile_mode
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    args.host_threads = torch.get_num_threads()
    gpu = torch.device("cuda") if torch.cuda.is_available() else None
    result: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if gpu else "cpu only",
        "cpu": cpu_name(),
        "threads": args.threads,
        "command": " ".join(sys.argv),
        "models": [],
    }
    for p in args.base:
        base, card = load_model(p)
        test = load_dataset(card.extra["dataset"], "test", download=False)
        entry: dict[str, Any] = {
            "base": str(p),
            "model": card.architecture["name"],
            "dataset": card.extra["dataset"],
            "base_accuracy": accuracy(base, test, gpu or torch.device("cpu")),
            "plans": [],
        }
        for plan in plans:
            entry["plans"].append(run_plan(base.cpu(), card, plan, args, gpu))
            atomic_write_json(args.out, {**result, "models": [*result["models"], entry]})
        result["models"].append(entry)
    if args.tt:
        result["tt"] = part_tt(args, gpu)
    atomic_write_json(args.out, result)
    for m in result["models"]:
        for pl in m["plans"]:
            print(
                f"{m['model']} {pl['plan']}: acc {100 * m['base_accuracy']:.2f} -> "
                f"{100 * pl['accuracy']:.2f}, params /{pl['params_ratio']:.2f}, "
                f"FLOPs /{pl['flop_ratio']:.2f}, layers {pl['layers_decomposed']}/"
                f"{pl['layers_targeted']}"
            )
            for s in pl["speed"]:
                print(
                    f"   {s['device']:<5} {'compiled' if s['compiled'] else 'eager':<8} "
                    f"b{s['batch']:<5} {s['base_ms']:9.3f} -> {s['compressed_ms']:9.3f} ms  "
                    f"x{s['speedup']:.2f} (FLOP ratio {s['flop_ratio']:.2f})"
                )
    if "tt" in result:
        t = result["tt"]
        print(
            f"TT mlp: acc {100 * t['accuracy_before']:.2f} -> {100 * t['accuracy']:.2f}, "
            f"hidden params /{t['hidden_params_ratio']:.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
