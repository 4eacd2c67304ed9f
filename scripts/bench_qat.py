"""W4A8 quantization of a trained classifier: float32 vs post-training vs quantization-aware.

Takes a slimtorch model directory (e.g. resnet20 trained on Fashion-MNIST with ``slimtorch
train``) and reports test accuracy of

- ``fp32``: the model as trained;
- ``ptq_w4a8``: post-training quantization, 4-bit per-channel min/max weights and 8-bit static
  activations calibrated on training batches (``slimtorch.quant.ptq.quantize_``);
- ``qat_w4a8_fakequant``: LSQ quantization-aware fine-tuning for ``--epochs`` epochs
  (``QATCallback`` in the one Trainer), evaluated with its fake quantizers;
- ``qat_w4a8_int8``: the same model converted to int8 Q/DQ layers (``convert_qat_``), the
  runtime path PTQ uses, with the agreement of its predictions with the fake-quant model.

    python scripts/bench_qat.py --model-dir runs/resnet20-fmnist/model --epochs 5 --lr 0.005 \
        --device cuda --out results/qat_w4a8.json

A smoke run on a tiny subset: ``--train-subset 512 --test-subset 256 --epochs 1``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _bench_common import model_dir_type, positive_int
from torch import nn

from slimtorch.core.devices import run_info
from slimtorch.core.io import atomic_write_json
from slimtorch.data import DeviceLoader, load_dataset
from slimtorch.models import load_model
from slimtorch.quant.qat import QATCallback, QATConfig
from slimtorch.quant.qat_convert import convert_qat_
from slimtorch.train import TrainConfig, Trainer
from slimtorch.train.classifier import default_augment

log = logging.getLogger("bench_qat")


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model-dir",
        required=True,
        type=model_dir_type("--model-dir"),
        help="trained slimtorch model directory, or the run directory holding it in model/",
    )
    p.add_argument("--dataset", default=None, help="dataset name (default: the model card's)")
    p.add_argument("--data-root", default=None, help="dataset folder (else $SLIMTORCH_DATA)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--epochs", type=int, default=3, help="QAT fine-tuning epochs")
    p.add_argument("--lr", type=float, default=0.005, help="QAT peak learning rate (SGD)")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--weight-bits", type=int, default=4, choices=(4, 8))
    p.add_argument("--act-bits", type=int, default=8, choices=(4, 8))
    p.add_argument("--calibration-batches", type=int, default=16)
    p.add_argument("--train-subset", type=int, default=None, help="first N training samples")
    p.add_argument("--test-subset", type=int, default=None, help="first N test samples")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--spike-clip",
        type=float,
        default=QATConfig.spike_clip,
        help="QATConfig.spike_clip; 0: no clipping",
    )
    p.add_argument("--out", type=Path, required=True, help="JSON results file")
    return p.parse_args(argv)


def _accuracy(model: nn.Module, loader: DeviceLoader, device: torch.device) -> float:
    trainer = Trainer(model, TrainConfig(epochs=1, amp="off", progress=False), device=device)
    return float(trainer.evaluate(loader)["accuracy"])


def _ptq(model: nn.Module, calibration: list[torch.Tensor], bits: int) -> dict[str, Any]:
    from slimtorch.quant.ptq import PTQConfig, quantize_

    cfg = PTQConfig(
        mode="static",
        weight_bits=bits,
        observer="minmax",
        weight_observer="minmax",
        quantize_residuals=False,
        calibration_batches=len(calibration),
    )
    report = quantize_(model, cfg, calibration=calibration)
    return {"config": cfg.to_dict(), "quantized": len(report.quantized)}


@torch.no_grad()
def _agreement(a: nn.Module, b: nn.Module, loader: DeviceLoader) -> float:
    same = total = 0
    a.eval()
    b.eval()
    for x, _ in loader:
        same += int((a(x).argmax(1) == b(x).argmax(1)).sum())
        total += int(x.shape[0])
    return same / max(total, 1)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, card = load_model(args.model_dir, device=device)
    dataset = args.dataset or card.extra.get("dataset")
    if not dataset:
        raise SystemExit("the model card names no dataset; pass --dataset")
    train_ds = load_dataset(dataset, "train", root=args.data_root, download=False)
    test_ds = load_dataset(dataset, "test", root=args.data_root, download=False)
    if args.train_subset:
        train_ds = train_ds.subset(torch.arange(min(args.train_subset, len(train_ds.labels))))
    if args.test_subset:
        test_ds = test_ds.subset(torch.arange(min(args.test_subset, len(test_ds.labels))))
    train = DeviceLoader(
        train_ds,
        args.batch_size,
        shuffle=True,
        drop_last=True,
        device=device,
        augment=default_augment(dataset),
        seed=args.seed,
    )
    test = DeviceLoader(test_ds, 1024, device=device)
    calib = [
        x
        for i, (x, _) in enumerate(DeviceLoader(train_ds, args.batch_size, device=device))
        if i < args.calibration_batches
    ]
    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    results["fp32"] = {"accuracy": _accuracy(model, test, device)}

    ptq_model = copy.deepcopy(model)
    info = _ptq(ptq_model, calib, args.weight_bits)
    results[f"ptq_w{args.weight_bits}a8"] = {"accuracy": _accuracy(ptq_model, test, device), **info}

    qat_model = copy.deepcopy(model)
    qcfg = QATConfig(
        weight_bits=args.weight_bits,
        act_bits=args.act_bits,
        spike_clip=args.spike_clip or None,
    )
    tcfg = TrainConfig(
        epochs=args.epochs,
        lr=args.lr,
        optimizer="sgd",
        momentum=0.9,
        weight_decay=5e-4,
        schedule="cosine",
        amp="off",
        seed=args.seed,
        eval_every_epochs=0,
        progress=sys.stderr.isatty(),
    )
    start = time.perf_counter()
    history = Trainer(qat_model, tcfg, device=device, callbacks=[QATCallback(qcfg)]).fit(train)
    train_s = time.perf_counter() - start
    tag = f"w{args.weight_bits}a{args.act_bits}"
    fake = copy.deepcopy(qat_model)
    results[f"qat_{tag}_fakequant"] = {
        "accuracy": _accuracy(fake, test, device),
        "train_seconds": train_s,
        "train_loss": history.to_dict().get("train_loss"),
        "qat_config": qcfg.to_dict(),
        "train_config": tcfg.to_dict(),
    }
    report = convert_qat_(qat_model, widen_4bit_activations=args.act_bits < 8)
    results[f"qat_{tag}_int8"] = {
        "accuracy": _accuracy(qat_model, test, device),
        "agreement_with_fakequant": _agreement(qat_model, fake, test),
        "quantized": len(report.quantized),
    }
    out = {
        "benchmark": "qat",
        **run_info(device, [sys.argv[0], *(argv or sys.argv[1:])]),
        "model_dir": str(args.model_dir),
        "architecture": card.architecture,
        "dataset": dataset,
        "n_train": len(train_ds.labels),
        "n_test": len(test_ds.labels),
        "total_seconds": time.perf_counter() - t0,
        "results": results,
    }
    atomic_write_json(args.out, out)
    for name, res in results.items():
        log.info("%-24s accuracy %.4f", name, res["accuracy"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
