"""Dense vs static-sparse vs SET vs RigL on Fashion-MNIST, same model, sparsity and step count.

Each method trains the same architecture from the same seed with the same ``TrainConfig``
through ``slimtorch.train.classifier.train_classifier``; the sparse ones add their callback
(ERK distribution, masks updated every ``--delta-t`` steps until ``--t-end`` of the run). Writes
one JSON file (``--out``, atomically) with, per method: test accuracy, per-epoch validation
accuracy and epoch time, total training time, the final per-layer active-weight counts and, for
SET and RigL, every mask update's record (explored fraction, share of grown weights kept).
Run from the repository root:

    python scripts/train_sparse.py --epochs 30 --batch-size 128 --device cuda \
        --sparsity 0.9 --out docs/results/sparse-training-fmnist.json
    python scripts/train_sparse.py --model mlp --epochs 1 --methods dense,rigl --device cpu \
        --threads 2 --out /tmp/train-sparse-smoke.json      # a quick smoke run
    python scripts/train_sparse.py --methods set,rigl --alpha 0.5 --val-fraction 0.1 \
        --device cuda --out /tmp/a05.json   # choose alpha/delta-T on held-out training images

The reported epoch times include each callback's work (mask updates), so the overhead of RigL
and SET over static masks shows up in them directly.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch
from _bench_common import positive_int

from slimtorch.core.devices import run_info
from slimtorch.core.io import atomic_write_json
from slimtorch.sparse import StaticSparse, make_sparse_callback
from slimtorch.train import TrainConfig
from slimtorch.train.classifier import train_classifier

log = logging.getLogger("train_sparse")

METHODS = ("dense", "static", "set", "rigl")


def run_method(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train one method; return its accuracy, per-epoch figures and final mask counts."""
    callbacks: list[StaticSparse] = []
    if method != "dense":
        callbacks.append(
            make_sparse_callback(
                method,
                args.sparsity,
                distribution=args.distribution,
                delta_t=args.delta_t,
                alpha=args.alpha,
                t_end=args.t_end,
                seed=args.seed,
                scale_init=not args.dense_init,
            )
        )
    config = TrainConfig(
        epochs=args.epochs,
        optimizer="sgd",
        lr=args.lr,
        momentum=0.9,
        weight_decay=args.weight_decay,
        schedule="cosine",
        amp=args.amp,
        seed=args.seed,
        progress=args.progress,
    )
    out_dir = Path(args.run_dir) / method if args.run_dir else None
    run = train_classifier(
        model=args.model,
        dataset=args.dataset,
        out_dir=out_dir,
        train_config=config,
        batch_size=args.batch_size,
        device=args.device,
        data_root=args.data_root,
        callbacks=callbacks,
        download=False,
        val_fraction=args.val_fraction,
    )
    history = run.history
    result: dict[str, Any] = {
        "method": method,
        "test_accuracy": run.test_metrics["accuracy"],
        "test_loss": run.test_metrics["loss"],
        "final_val_accuracy": run.val_metrics["accuracy"] if run.val_metrics else None,
        "train_seconds": run.train_seconds,
        "epoch_time_s": history.get("epoch_time_s"),
        "val_accuracy": history.get("val_accuracy"),
        "train_loss": history.get("train_loss"),
    }
    if callbacks:
        cb = callbacks[0]
        summary = cb.summary(run.model)
        active = sum(r["active"] for r in summary.values())
        total = sum(r["numel"] for r in summary.values())
        result.update(
            sparsity=1 - active / total,
            layers=summary,
            updates=len(getattr(cb, "updates", [])),
            # per update: step, drop fraction, swaps, explored fraction, grown share kept
            update_log=list(getattr(cb, "updates", [])),
            skipped_updates=list(getattr(cb, "skipped_updates", [])),
        )
    log.warning(
        "%s: test accuracy %.4f, %.1f s", method, result["test_accuracy"], run.train_seconds
    )
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--data-root", default=None, help="dataset folder (default: SLIMTORCH_DATA)")
    ap.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--distribution", default="erk", choices=("erk", "uniform"))
    ap.add_argument("--delta-t", type=int, default=100)
    ap.add_argument("--alpha", type=float, default=0.3)
    ap.add_argument("--t-end", type=float, default=0.75)
    ap.add_argument(
        "--dense-init", action="store_true", help="keep dense initial weights (no fan-in scaling)"
    )
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=positive_int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--amp", default="auto", choices=("off", "auto", "bf16", "fp16"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=positive_int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="hold out this fraction of the training set (stratified, fixed split) and report "
        "per-epoch accuracy on it instead of on the test set: choose delta-T/alpha by it",
    )
    ap.add_argument("--run-dir", default=None, help="keep each method's run directory here")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--out", required=True, help="JSON output path")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        ap.error(f"--methods must be among {', '.join(METHODS)}; got {unknown}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = [run_method(m, args) for m in args.methods]
    payload = {
        **run_info(args.device),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "progress")},
        "results": results,
    }
    atomic_write_json(args.out, payload)
    for r in results:
        val = r["final_val_accuracy"]
        print(
            f"{r['method']:>7}: test accuracy {r['test_accuracy']:.4f}  "
            + (f"val accuracy {val:.4f}  " if val is not None else "")
            + f"sparsity {r.get('sparsity', 0.0):.3f}  train {r['train_seconds']:.1f} s"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
