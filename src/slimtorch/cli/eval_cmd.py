"""``slimtorch eval``: accuracy and loss of a saved model directory on a dataset split."""

from __future__ import annotations

import argparse
import json
from typing import Any

from slimtorch.cli.common import (
    DATASET_HELP,
    add_device_args,
    apply_threads,
    dataset_arg,
    model_dir_arg,
)


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
        "--dataset",
        type=dataset_arg,
        default=None,
        help=f"{DATASET_HELP}; default: the dataset it was trained on",
    )
    p.add_argument("--split", choices=("train", "test"), default="test")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--data-root", default=None, help="dataset folder (else $SLIMTORCH_DATA)")
    p.add_argument("--no-download", action="store_true", help="never download dataset files")
    add_device_args(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from slimtorch.core.devices import resolve_device
    from slimtorch.data import DeviceLoader, dataset_classes, dataset_info, is_image_folder
    from slimtorch.models import load_model
    from slimtorch.train import TrainConfig, Trainer

    apply_threads(args)
    device = resolve_device(args.device)
    model, card = load_model(model_dir_arg(args.model_dir), device=device)
    dataset = args.dataset or card.dataset
    if dataset is None:
        raise ValueError(f"{args.model_dir} does not record its dataset; pass --dataset")
    classes = dataset_classes(dataset)  # checked before any image is read
    if card.class_names and tuple(card.class_names) != tuple(classes):
        raise ValueError(
            f"the model's classes ({', '.join(card.class_names[:4])}, ...) are not {dataset}'s "
            f"({', '.join(classes[:4])}, ...): its accuracy there would mean nothing; pick "
            "the dataset it was trained on"
        )
    channels = None if is_image_folder(dataset) else len(dataset_info(dataset).mean)
    if channels is not None and channels != card.input_shape[0]:  # a folder is read to fit
        raise ValueError(
            f"{dataset} images have {channels} channel(s) but the model expects "
            f"{tuple(card.input_shape)}; pick a matching --dataset"
        )
    # read at the model's input shape, normalised as the model was trained
    ds = card.load_split(
        args.split, dataset=dataset, root=args.data_root, download=not args.no_download
    )
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
