"""ONNX Runtime, int8 stem against float stem: both int8 exports and the fp32 one, interleaved.

``export_onnx(..., target="onnxruntime")`` chooses between running a narrow stem int8 (input
channels zero-padded to four) and float by timing both at export; this script measures the two
exports side by side against fp32 at batch 1 and 32 on one thread, so the choice can be checked
on any machine.

    taskset -c 1 python scripts/bench_ort_stem.py --model-dir runs/gpu/resnet20-fmnist/model \\
        --data ../shared/data --out results.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnx
import torch
from _bench_common import card_dataset, cpu_name, model_dir_type, positive_int

from slimtorch.core.io import atomic_write_json
from slimtorch.data import load_dataset
from slimtorch.models import load_model
from slimtorch.quant import PTQConfig, quantize_
from slimtorch.quant.export import export_onnx
from slimtorch.quant.ort_graph import time_graphs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model-dir",
        required=True,
        type=model_dir_type("--model-dir"),
        help="a slimtorch model directory, or the run directory holding it in model/",
    )
    ap.add_argument("--data", required=True, help="folder holding <dataset>/")
    ap.add_argument(
        "--dataset",
        default=None,
        help="dataset to calibrate on (default: the model card's, else fashion-mnist)",
    )
    ap.add_argument("--rounds", type=positive_int, default=30)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, card = load_model(args.model_dir)
    model.eval()
    mean, std = card.mean[0], card.std[0]
    dataset = card_dataset(card, args.dataset)
    root = str(Path(args.data) / dataset)
    train = load_dataset(dataset, "train", root=root, download=False)
    test = load_dataset(dataset, "test", root=root, download=False)
    xtr = (train.images.float() / 255 - mean) / std
    xte = (test.images[:64].float() / 255 - mean) / std
    calib = list(xtr[torch.randperm(len(xtr))[:1024]].split(64))
    int8 = copy.deepcopy(model)
    quantize_(int8, PTQConfig(mode="static"), calibration=calib)
    with tempfile.TemporaryDirectory() as tmp:
        graphs = {"fp32": onnx.load(export_onnx(model, Path(tmp) / "fp32.onnx", xte[:1]))}
        for mode in ("int8", "float"):
            path = export_onnx(int8, Path(tmp) / f"{mode}.onnx", xte[:1], narrow_convs=mode,
                               calibration=calib)  # fmt: skip
            graphs[mode] = onnx.load(path)
    res: dict[str, object] = {
        "command": " ".join([sys.executable, *sys.argv]),
        "device": cpu_name(),
        "date": time.strftime("%Y-%m-%d"),
        "dataset": dataset,
    }
    for b in (1, 32):
        min_time_s = 0.05 if b == 1 else 0.2
        samples = time_graphs(graphs, xte[:b], rounds=args.rounds, min_time_s=min_time_s)
        ms = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
        speedup = {
            k: statistics.median([f / i for f, i in zip(samples["fp32"], samples[k], strict=True)])
            for k in ("int8", "float")
        }
        res[f"b{b}"] = {"ms": ms, "speedup": speedup}
        stems = " | ".join(f"{k} stem {ms[k]:.3f} ms {speedup[k]:.2f}x" for k in ("int8", "float"))
        print(f"b{b}: fp32 {ms['fp32']:.3f} ms | {stems}")
    atomic_write_json(args.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
