"""``slimtorch eval``: accuracy and loss of a saved model directory on a dataset split."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from slimtorch.cli.common import DATASETS, add_device_args, apply_threads, model_dir_arg


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a saved model directory",
        description="Evaluate a saved model (a model directory, or a run directory holding one "
        "in model/) on a split of its dataset, its inputs normalised as in its training and its "
        "weights in their own precision; prints one JSON line with the accuracy, the loss and "
        "the number of images. Writes nothing.",
    )
    p.add_argument("--in", dest="model_dir", required=True, help="model or run directory")
    p.add_argument(
        "--dataset", choices=DATASETS, default=None, help="default: the dataset it was trained on"
    )
    p.add_argument("--split", choices=("train", "test"), default="test")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--data-root", default=None, help="dataset folder (else $SLIMTORCH_DATA)")
    p.add_argument("--no-download", action="store_true", help="never download dataset files")
    add_device_args(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from slimtorch.core.devices import resolve_device
    from slimtorch.data import DeviceLoader, dataset_info, load_dataset
    from slimtorch.models import load_model
    from slimtorch.train import TrainConfig, Trainer

    apply_threads(args)
    device = resolve_device(args.device)
    model, card = load_model(model_dir_arg(args.model_dir), device=device)
    dataset = args.dataset or card.extra.get("dataset")
    if dataset is None:
        raise ValueError(f"{args.model_dir} does not record its dataset; pass --dataset")
    info = dataset_info(dataset)  # what the catalog knows is checked before any file is read
    if card.class_names and tuple(card.class_names) != tuple(info.classes):
        raise ValueError(
            f"the model's classes ({', '.join(card.class_names[:4])}, ...) are not {dataset}'s "
            f"({', '.join(info.classes[:4])}, ...): its accuracy there would mean nothing; pick "
            "the dataset it was trained on"
        )
    if len(info.mean) != card.input_shape[0]:
        raise ValueError(
            f"{dataset} images have {len(info.mean)} channel(s) but the model expects "
            f"{tuple(card.input_shape)}; pick a matching --dataset"
        )
    ds = load_dataset(dataset, args.split, root=args.data_root, download=not args.no_download)
    if tuple(ds.input_shape) != tuple(card.input_shape):
        raise ValueError(
            f"{dataset} images are {tuple(ds.input_shape)} but the model expects "
            f"{tuple(card.input_shape)}; pick a matching --dataset"
        )
    # the inputs are normalised as the model was trained, whichever dataset they come from
    ds = dataclasses.replace(ds, mean=tuple(card.mean), std=tuple(card.std))
    loader = DeviceLoader(ds, args.batch_size, device=device)
    trainer = Trainer(model, TrainConfig(epochs=1, amp="off"), device=device)  # in its dtype
    metrics = trainer.evaluate(loader)
    print(
        json.dumps(
            {
                "model_dir": args.model_dir,
                "dataset": dataset,
                "split": args.split,
                "accuracy": round(float(metrics["accuracy"]), 4),
                "loss": round(float(metrics["loss"]), 4),
                "n": int(metrics["n"]),
            }
        )
    )
    return 0
