"""Decomposition benchmarks: slimtorch vs TensorLy (speed at equal error), error-vs-rank curves.

Writes one JSON file (``--out``, atomically) and prints a short table. Run from the repository root:

    python scripts/bench_decompose.py --part all --device cpu --threads 2 --quick --out /tmp/bd.json
    python scripts/bench_decompose.py --part speed --methods tucker2 --device cpu --threads 2 \
        --repeats 3 --out docs/results/decompose-speed-cpu.json
    python scripts/bench_decompose.py --part speed --methods tucker2 --device cuda --batched \
        --repeats 3 --out docs/results/decompose-speed-batched-gpu.json
    python scripts/bench_decompose.py --part all --device cuda --out docs/results/decompose-gpu.json
    python scripts/bench_decompose.py --part curves --model-dir runs/resnet20 --out curves.json

Parts:
  speed   The 53 conv kernel shapes of torchvision's ResNet-50, random float32 weights (fixed seed)
          on the device: a fair stand-in for trained kernels, as the cost of a HOOI or ALS sweep
          depends on shapes and ranks, not on values. Tucker-2 at ranks (C_out//4, C_in//4) on
          every kernel (1x1 included: it acts on the channel modes); CP at rank min(C_out, C_in)//4
          on the 16 3x3 kernels only (a 1x1 kernel's spatial CP factors are scalars, so CP would
          reduce to a matrix factorisation, which the truncated SVD solves exactly). Both libraries
          get the same ranks, SVD init, sweep cap and tolerance (TensorLy on its pytorch backend);
          each kernel is run by both in turn (who goes first alternates), synchronised around each
          call, after one untimed warm-up kernel each. Reported: total time, speed-up = tensorly /
          slimtorch, mean and max relative error (float64, outside the timing). --repeats N times
          each kernel N times and sums the medians (and, in the JSON, the minima). A kernel that
          one library fails on is recorded with the message and left out of the totals.
          --batched also times tucker2_many (Tucker-2) and cp_als_many (CP) over all the
          compared kernels of each method in one call (same ranks, sweep cap and tolerance; one
          untimed warm-up call on the warm-up kernel; median of --repeats calls), against
          TensorLy's per-kernel total from the same run, with the mean and max relative error
          of its results.
  curves  Relative error vs rank at 1/16, 1/8, 1/4, 1/2 and 1 of the full rank: truncated SVD and
          TT-matrix on Linear weights, Tucker-2 on conv kernels, CP on spatial conv kernels (full
          CP rank taken as min(C_out, C_in)). With --model-dir, a few layers of a slimtorch model
          directory; otherwise random ResNet-50-shaped weights (a flat spectrum: the worst case).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
import math
import operator
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _bench_common import model_dir_type, positive_int
from torch import nn

from slimtorch.core.devices import cpu_threads, detect_devices, resolve_device, synchronize
from slimtorch.core.io import atomic_write_json
from slimtorch.decompose import (
    cp_als,
    cp_als_many,
    rank_from_fraction,
    relative_error,
    split_modes,
    truncated_svd,
    tt_matrix,
    tt_matrix_to_full,
    tucker2,
    tucker2_many,
    tucker2_to_full,
)

log = logging.getLogger("bench_decompose")

Shape = tuple[int, int, int, int]
# torchvision resnet50: Bottleneck blocks (expansion 4), stages of [3, 4, 6, 3] blocks, stride on
# conv2 (v1.5). Per block: conv1 1x1, conv2 3x3, conv3 1x1, and downsample.0 1x1 in each stage's
# first block. Shapes are (C_out, C_in, kh, kw).
_BLOCKS: list[tuple[str, list[Shape]]] = [
    ("layer1.0", [(64, 64, 1, 1), (64, 64, 3, 3), (256, 64, 1, 1), (256, 64, 1, 1)]),
    ("layer1.1", [(64, 256, 1, 1), (64, 64, 3, 3), (256, 64, 1, 1)]),
    ("layer1.2", [(64, 256, 1, 1), (64, 64, 3, 3), (256, 64, 1, 1)]),
    ("layer2.0", [(128, 256, 1, 1), (128, 128, 3, 3), (512, 128, 1, 1), (512, 256, 1, 1)]),
    ("layer2.1", [(128, 512, 1, 1), (128, 128, 3, 3), (512, 128, 1, 1)]),
    ("layer2.2", [(128, 512, 1, 1), (128, 128, 3, 3), (512, 128, 1, 1)]),
    ("layer2.3", [(128, 512, 1, 1), (128, 128, 3, 3), (512, 128, 1, 1)]),
    ("layer3.0", [(256, 512, 1, 1), (256, 256, 3, 3), (1024, 256, 1, 1), (1024, 512, 1, 1)]),
    ("layer3.1", [(256, 1024, 1, 1), (256, 256, 3, 3), (1024, 256, 1, 1)]),
    ("layer3.2", [(256, 1024, 1, 1), (256, 256, 3, 3), (1024, 256, 1, 1)]),
    ("layer3.3", [(256, 1024, 1, 1), (256, 256, 3, 3), (1024, 256, 1, 1)]),
    ("layer3.4", [(256, 1024, 1, 1), (256, 256, 3, 3), (1024, 256, 1, 1)]),
    ("layer3.5", [(256, 1024, 1, 1), (256, 256, 3, 3), (1024, 256, 1, 1)]),
    ("layer4.0", [(512, 1024, 1, 1), (512, 512, 3, 3), (2048, 512, 1, 1), (2048, 1024, 1, 1)]),
    ("layer4.1", [(512, 2048, 1, 1), (512, 512, 3, 3), (2048, 512, 1, 1)]),
    ("layer4.2", [(512, 2048, 1, 1), (512, 512, 3, 3), (2048, 512, 1, 1)]),
]
RESNET50_CONVS: list[tuple[str, Shape]] = [("conv1", (64, 3, 7, 7))] + [
    (f"{block}.{conv}", shape)
    for block, shapes in _BLOCKS
    for conv, shape in zip(("conv1", "conv2", "conv3", "downsample.0"), shapes, strict=False)
]
assert len(RESNET50_CONVS) == 53, len(RESNET50_CONVS)
assert sum(s[2:] == (3, 3) for _, s in RESNET50_CONVS) == 16
# 25,557,032 parameters in all, less fc (2048 * 1000 + 1000) and 53 BatchNorms (53,120).
assert sum(math.prod(s) for _, s in RESNET50_CONVS) == 23_454_912
FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)
SEED = 0


def random_weight(shape: tuple[int, ...], index: int, device: torch.device) -> torch.Tensor:
    """He-scaled Gaussian weight, drawn on the CPU (same values on every device)."""
    gen = torch.Generator().manual_seed(SEED + index)
    fan_in = math.prod(shape[1:])
    return (torch.randn(shape, generator=gen) * math.sqrt(2.0 / fan_in)).to(device)


def rel_err(approx: torch.Tensor, ref: torch.Tensor) -> float:
    return float(relative_error(approx.double(), ref.double()))


def timed(device: torch.device, fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """``(fn(*args), seconds)``, with a device synchronise before and after the call."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn(*args)
    synchronize(device)
    return out, time.perf_counter() - t0


# --- speed ----------------------------------------------------------------------------------


def _runners(method: str, n_iter: int, tol: float) -> dict[str, tuple[Callable, Callable]]:
    """``library -> (decompose(w, rank) -> (result, sweeps), rebuild(result) -> tensor)``."""
    import tensorly as tl
    from tensorly.decomposition import parafac, partial_tucker
    from tensorly.tenalg import multi_mode_dot

    tl.set_backend("pytorch")
    opts = {"init": "svd", "n_iter_max": n_iter, "tol": tol, "random_state": SEED}

    def tl_tucker(w: torch.Tensor, r: tuple[int, int]) -> tuple[Any, int]:
        (core, factors), errors = partial_tucker(w, rank=list(r), modes=[0, 1], **opts)
        return (core, factors), len(errors)

    def st_cp(w: torch.Tensor, r: int) -> tuple[Any, int]:
        res = cp_als(w, r, n_iter=n_iter, tol=tol, init="svd", require_convergence=False)
        return res, res.iterations

    def tl_cp(w: torch.Tensor, r: int) -> tuple[Any, int]:
        cp, errors = parafac(w, r, return_errors=True, **opts)
        return cp, len(errors)

    if method == "tucker2":
        return {
            "slimtorch": (
                lambda w, r: (tucker2(w, r, n_iter=n_iter, tol=tol), None),
                lambda f: tucker2_to_full(*f),
            ),
            "tensorly": (tl_tucker, lambda f: multi_mode_dot(f[0], f[1], modes=[0, 1])),
        }
    return {
        "slimtorch": (st_cp, lambda res: res.to_full()),
        "tensorly": (tl_cp, tl.cp_to_tensor),
    }


def _many_runner(method: str, n_iter: int, tol: float) -> tuple[Callable, Callable]:
    """``(decompose_many(ws, ranks) -> results, rebuild(result) -> tensor)`` of ``method``."""
    if method == "tucker2":
        return (
            lambda ws, ranks: tucker2_many(ws, ranks, n_iter=n_iter, tol=tol),
            lambda f: tucker2_to_full(*f),
        )
    return (
        lambda ws, ranks: cp_als_many(
            ws, ranks, n_iter=n_iter, tol=tol, init="svd", require_convergence=False
        ),
        lambda res: res.to_full(),
    )


def compare_batched(
    method: str,
    kernels: list[tuple[int, Shape]],
    rank_of: Callable[[Shape], Any],
    n_iter: int,
    tol: float,
    device: torch.device,
    repeats: int,
) -> dict[str, Any]:
    """Time ``tucker2_many`` or ``cp_als_many`` on ``[(seed index, shape)]`` in one call
    (median of ``repeats``)."""
    ws = [random_weight(shape, i, device) for i, shape in kernels]
    ranks = [rank_of(s) for _, s in kernels]
    warm = random_weight(kernels[0][1], 10_000, device)
    run, rebuild = _many_runner(method, n_iter, tol)
    timed(device, run, [warm], ranks[:1])  # warm-up
    runs = [timed(device, run, ws, ranks) for _ in range(repeats)]
    errs = [rel_err(rebuild(f), w) for f, w in zip(runs[-1][0], ws, strict=True)]
    groups = len({(s, r) for (_, s), r in zip(kernels, ranks, strict=True)})
    out: dict[str, Any] = {"kernels": len(kernels), "groups": groups}
    out |= {"slimtorch_s": statistics.median(t for _, t in runs), "times": [t for _, t in runs]}
    out |= {"slimtorch_min_s": min(t for _, t in runs), "errors": errs}
    out |= {"slimtorch_mean_error": sum(errs) / len(errs), "slimtorch_max_error": max(errs)}
    if method == "cp":
        out["sweeps"] = [res.iterations for res in runs[-1][0]]
    return out


def compare(
    method: str,
    layers: list[tuple[str, Shape]],
    n_iter: int,
    device: torch.device,
    repeats: int,
    batched: bool = False,
) -> dict[str, Any]:
    """Time both libraries on every kernel (median of ``repeats`` calls); errors outside timing.

    With ``batched``, also time ``tucker2_many`` or ``cp_als_many`` on the compared kernels, in
    one call.
    """
    tol = 1e-6
    runners = _runners(method, n_iter, tol)

    def rank_of(s: Shape) -> Any:
        if method == "tucker2":
            return (max(1, s[0] // 4), max(1, s[1] // 4))
        return max(1, min(s[0], s[1]) // 4)

    warm = random_weight(layers[0][1], 10_000, device)
    for decompose, _ in runners.values():  # warm-up: libraries, kernels, solver handles
        with contextlib.suppress(Exception):  # a failure shows up again in the timed loop
            timed(device, decompose, warm, rank_of(layers[0][1]))
    rows = []
    for i, (name, shape) in enumerate(layers):
        w = random_weight(shape, i, device)
        row: dict[str, Any] = {"layer": name, "shape": list(shape), "rank": rank_of(shape)}
        for lib in list(runners) if i % 2 == 0 else list(reversed(runners)):
            decompose, rebuild = runners[lib]
            try:
                runs = [timed(device, decompose, w, rank_of(shape)) for _ in range(repeats)]
            except Exception as exc:  # recorded, and left out of the totals
                row |= {f"{lib}_failed": f"{type(exc).__name__}: {exc}"}
                log.warning("%s %s %s: %s failed: %s", method, name, shape, lib, exc)
                continue
            (result, sweeps), seconds = runs[-1][0], statistics.median(t for _, t in runs)
            row |= {f"{lib}_s": seconds, f"{lib}_error": rel_err(rebuild(result), w)}
            row |= {f"{lib}_sweeps": sweeps, f"{lib}_times": [t for _, t in runs]}
        rows.append(row)
        figures = " ".join(f"{k}={v:.4g}" for k, v in row.items() if k.endswith(("_s", "_error")))
        log.info("%s %s %s %s", method, name, shape, figures)
    both = [r for r in rows if not any(k.endswith("_failed") for k in r)]
    out: dict[str, Any] = {"kernels": len(rows), "compared": len(both), "n_iter": n_iter}
    rule = "(C_out//4, C_in//4)" if method == "tucker2" else "min(C_out, C_in)//4"
    out |= {"tol": tol, "rank_rule": rule, "repeats": repeats}
    for lib in runners:
        errs = [r[f"{lib}_error"] for r in both] or [math.nan]
        out[f"{lib}_failed"] = [r["layer"] for r in rows if f"{lib}_failed" in r]
        out[f"{lib}_s"] = sum(r[f"{lib}_s"] for r in both)
        out[f"{lib}_min_s"] = sum(min(r[f"{lib}_times"]) for r in both)  # robust to stalls
        out[f"{lib}_mean_error"], out[f"{lib}_max_error"] = sum(errs) / len(errs), max(errs)
    out["speedup"] = out["tensorly_s"] / out["slimtorch_s"] if both else math.nan
    out["speedup_min"] = out["tensorly_min_s"] / out["slimtorch_min_s"] if both else math.nan
    out["error_ok"] = out["slimtorch_mean_error"] <= out["tensorly_mean_error"] * 1.01
    if batched and both:
        seeds = {name: i for i, (name, _) in enumerate(layers)}  # the weights timed above
        kernels = [(seeds[r["layer"]], tuple(r["shape"])) for r in both]
        b = compare_batched(method, kernels, rank_of, n_iter, tol, device, repeats)
        b["speedup"] = out["tensorly_s"] / b["slimtorch_s"]
        b["speedup_min"] = out["tensorly_min_s"] / b["slimtorch_min_s"]
        b["speedup_vs_per_kernel"] = out["slimtorch_s"] / b["slimtorch_s"]  # ours, one by one
        b["error_ok"] = b["slimtorch_mean_error"] <= out["tensorly_mean_error"] * 1.01
        log.info("%s batched: %d kernels, %d groups, %.4g s", method, b["kernels"], b["groups"],
                 b["slimtorch_s"])  # fmt: skip
        out["batched"] = b
    return out | {"rows": rows}


def part_speed(
    device: torch.device, quick: bool, repeats: int, methods: list[str], batched: bool = False
) -> dict[str, Any]:
    warnings.filterwarnings("ignore", category=UserWarning, module=r"tensorly\.")
    for name in ("slimtorch.decompose.cp", "slimtorch.decompose.cp_batched"):
        logging.getLogger(name).setLevel(logging.ERROR)  # cap hits: see sweeps
    layers = RESNET50_CONVS
    if quick:
        keep = {"conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv2", "layer3.0.conv3"}
        layers = [(n, s) for n, s in layers if n in keep]
    spatial = [(n, s) for n, s in layers if s[2:] == (3, 3)]
    plan = {"tucker2": (layers, 5 if quick else 25), "cp": (spatial, 10 if quick else 100)}
    return {m: compare(m, *plan[m], device, repeats, batched) for m in methods}


# --- curves ---------------------------------------------------------------------------------


def _pick(items: list[Any], k: int) -> list[Any]:
    """``k`` items spread evenly over ``items``, first and last included."""
    if len(items) <= k:
        return items
    return [items[round(i * (len(items) - 1) / max(k - 1, 1))] for i in range(k)]


def curve_layers(model_dir: str | Path | None, device: torch.device, quick: bool) -> list[Any]:
    """``[(name, weight)]``: a few conv and Linear weights of the model, or random ones."""
    n_conv, n_lin = (1, 1) if quick else (3, 2)
    if model_dir is None:
        named = [("conv64", (64, 64, 3, 3)), ("fc256", (256, 128))] if quick else [
            ("layer2.0.conv2", (128, 128, 3, 3)), ("layer3.0.conv1", (256, 512, 1, 1)),
            ("layer3.0.conv2", (256, 256, 3, 3)), ("fc", (1000, 2048)), ("fc512", (512, 512)),
        ]  # fmt: skip
        return [(n, random_weight(s, 100 + i, device)) for i, (n, s) in enumerate(named)]
    from slimtorch.models import load_model

    mods = dict(load_model(model_dir, device=device)[0].named_modules())
    convs = [n for n, m in mods.items() if isinstance(m, nn.Conv2d) and m.groups == 1]
    lins = sorted((n for n, m in mods.items() if isinstance(m, nn.Linear)),
                  key=lambda n: -mods[n].weight.numel())  # fmt: skip
    chosen = _pick([n for n in convs if mods[n].in_channels > 1], n_conv) + lins[:n_lin]
    log.info("curves on %s: %s", model_dir, chosen)
    return [(n, mods[n].weight.detach().float()) for n in chosen]


def _tt_modes(w: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    for d in (3, 2):
        ins, outs = split_modes(w.shape[1], d), split_modes(w.shape[0], d)
        if 1 not in ins and 1 not in outs:
            return ins, outs
    return None


def curve_rows(name: str, w: torch.Tensor, n_iter_cp: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def add(method: str, f: float, rank: Any, params: int, approx: Callable[[], Any]) -> None:
        row = {"layer": name, "shape": list(w.shape), "method": method, "fraction": f}
        row |= {"rank": rank, "rel_error": None, "params_ratio": params / w.numel()}
        try:
            row["rel_error"] = rel_err(approx(), w)
        except Exception as exc:  # a failed decomposition is a data point, not a crash
            row["failed"] = f"{type(exc).__name__}: {exc}"
            log.warning("curve %s %s rank %s failed: %s", name, method, rank, exc)
        rows.append(row)
        log.info("curve %s %s f=%.4g rank=%s error=%s", name, method, f, rank, row["rel_error"])

    if w.ndim == 2:
        m, n = w.shape
        modes = _tt_modes(w)
        for f in FRACTIONS:
            r = rank_from_fraction(min(m, n), f)
            add("svd", f, r, r * (m + n), lambda r=r: operator.matmul(*truncated_svd(w, r)))
            if modes is None:
                continue
            sizes = [o * i for o, i in zip(modes[1], modes[0], strict=True)]
            full = [math.prod(sizes[: k + 1]) for k in range(len(sizes) - 1)]
            full = [min(c, math.prod(sizes) // c) for c in full]
            cores = tt_matrix(w, *modes, max_rank=[rank_from_fraction(c, f) for c in full])
            ranks = [int(c.shape[3]) for c in cores[:-1]]
            params = sum(c.numel() for c in cores)
            add("tt", f, ranks, params, lambda cores=cores: tt_matrix_to_full(cores))
        if modes is None:
            log.info("curve %s: no TT modes > 1 for shape %s, tt skipped", name, tuple(w.shape))
        return rows
    c_out, c_in = w.shape[:2]
    k = math.prod(w.shape[2:])
    for f in FRACTIONS:
        ro, ri = rank_from_fraction(c_out, f), rank_from_fraction(c_in, f)
        params = c_in * ri + ro * ri * k + c_out * ro
        add("tucker2", f, [ro, ri], params, lambda r=(ro, ri): tucker2_to_full(*tucker2(w, r)))
    cp_opts = {"tol": 1e-6, "require_convergence": False}
    for f in FRACTIONS if k > 1 else ():
        r = rank_from_fraction(min(c_out, c_in), f)
        params = r * (c_out + c_in + sum(w.shape[2:]))
        add("cp", f, r, params, lambda r=r: cp_als(w, r, n_iter=n_iter_cp, **cp_opts).to_full())
    return rows


def part_curves(
    model_dir: str | Path | None, device: torch.device, quick: bool
) -> list[dict[str, Any]]:
    logging.getLogger("slimtorch.decompose.cp").setLevel(logging.ERROR)
    layers = curve_layers(model_dir, device, quick)
    return [row for name, w in layers for row in curve_rows(name, w, 10 if quick else 100)]


# --- main -----------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header, *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells)


def print_tables(result: dict[str, Any]) -> None:
    libs = ("slimtorch", "tensorly")
    if "speed" in result:
        print(f"speed: {result['device']}, {result['threads']} threads, float32")
        head = ["method", "kernels", "ours s", "tensorly s", "speed-up", "mean err ours", "theirs"]
        rows = []
        for m, s in result["speed"].items():
            errs = [f"{s[f'{lib}_{k}_error']:.5f}" for k in ("mean", "max") for lib in libs]
            times = [f"{s[f'{lib}_s']:.3f}" for lib in libs]
            ok = "yes" if s["error_ok"] else "NO"
            rows.append([m, f"{s['compared']}/{s['kernels']}", *times, f"{s['speedup']:.2f}x"])
            rows[-1] += [*errs, ok]
            if "batched" in s:  # tucker2_many / cp_als_many in one call vs TensorLy's total
                b = s["batched"]
                pairs = [(b, "slimtorch_mean_error"), (s, "tensorly_mean_error")]
                pairs += [(b, "slimtorch_max_error"), (s, "tensorly_max_error")]
                errs = [f"{d[k]:.5f}" for d, k in pairs]
                times = [f"{b['slimtorch_s']:.3f}", f"{s['tensorly_s']:.3f}"]
                rows.append([f"{m} batched", f"{b['kernels']}/{s['kernels']}", *times])
                rows[-1] += [f"{b['speedup']:.2f}x", *errs, "yes" if b["error_ok"] else "NO"]
        print(_table([*head, "max err ours", "theirs", "ours <= 1.01x"], rows))
        for m, s in result["speed"].items():
            for lib in (lib for lib in libs if s[f"{lib}_failed"]):
                print(f"{m}: {lib} failed on {len(s[f'{lib}_failed'])} kernel(s), see the JSON")
    if "curves" in result:
        head = ["layer", "method", "fraction", "rank", "rel_error", "params ratio"]
        rows = []
        for r in result["curves"]:
            err = "failed" if r["rel_error"] is None else f"{r['rel_error']:.4f}"
            rows.append([r["layer"], r["method"], f"{r['fraction']:.4g}", r["rank"], err])
            rows[-1].append(f"{r['params_ratio']:.3f}")
        print(_table(head, rows))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--part", choices=("speed", "curves", "all"), default="all")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument(
        "--threads", type=positive_int, default=None, help="torch CPU threads for the run"
    )
    ap.add_argument("--out", required=True, help="results JSON, written atomically")
    ap.add_argument(
        "--model-dir",
        type=model_dir_type("--model-dir"),
        default=None,
        help="slimtorch model directory (or the run directory holding it) for --part curves",
    )
    ap.add_argument("--methods", nargs="+", choices=("tucker2", "cp"), default=["tucker2", "cp"])
    ap.add_argument(
        "--repeats", type=positive_int, default=1, help="speed: median of N calls a kernel (>= 1)"
    )
    ap.add_argument("--quick", action="store_true", help="tiny settings to check the script runs")
    ap.add_argument(
        "--batched",
        action="store_true",
        help="speed: also time tucker2_many / cp_als_many over all compared kernels in one call",
    )
    args = ap.parse_args(argv)
    if args.batched and args.part == "curves":
        ap.error("--batched needs --part speed or all (it times the speed part's kernels)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    device = resolve_device(args.device)
    info = next(d for d in detect_devices() if d.device == str(device) or d.kind == device.type)
    with cpu_threads(args.threads) as threads:
        result: dict[str, Any] = {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "device": info.name,
            "device_kind": info.kind,
            "torch": torch.__version__,
            "threads": threads,
            "quick": args.quick,
            "seed": SEED,
            "command": shlex.join(sys.argv),
        }
        if args.part in ("speed", "all"):
            import tensorly

            result["tensorly"] = tensorly.__version__
            speed = part_speed(device, args.quick, args.repeats, args.methods, args.batched)
            result["speed"] = speed
        if args.part in ("curves", "all"):
            result["curves"] = part_curves(args.model_dir, device, args.quick)
    atomic_write_json(args.out, result)
    log.info("wrote %s", args.out)
    print_tables(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
