"""``slimtorch train``: train a zoo model on a dataset and write a model directory."""

from __future__ import annotations

import argparse
import json
from typing import Any

from slimtorch.cli.common import (
    DATASET_HELP,
    add_device_args,
    apply_threads,
    check_output_path,
    check_run_output,
    claim_run_folder,
    dataset_arg,
    model_choices,
    model_dir_arg,
    options_that_need,
    report_removed,
)
from slimtorch.train.classifier import remove_stale_outputs

# defaults of the options that act only with --teacher / --sparse (parsed as None so that
# giving one without its switch can be refused)
DISTILL_DEFAULTS: dict[str, object] = {"distill_temperature": 4.0, "distill_alpha": 0.9}
SPARSE_DEFAULTS: dict[str, object] = {
    "sparsity": 0.9,
    "sparse_distribution": "erk",
    "delta_t": 100,
    "alpha": 0.3,
    "t_end": 0.75,
    "dense_init": False,
}


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a model and write a model directory",
        description="Train a zoo model on a dataset. Writes the model directory --out/model "
        "(model.safetensors, config.json, metrics.json; what eval, profile, compress, export and "
        "serve read) and, in --out, history.json (per-epoch figures), train_config.json and a "
        "resumable checkpoint.pt; prints one JSON line with the test accuracy. An --out that "
        "already holds a run is refused unless --resume or --overwrite is given, and one that "
        "another slimtorch command is writing is refused (the file .slimtorch-run marks and locks "
        "the folder). Under torchrun "
        "(python -m torch.distributed.run -m slimtorch.cli train ...) it trains data-parallel.",
    )
    p.add_argument("--model", required=True, choices=model_choices(), help="architecture")
    p.add_argument(
        "--dataset", default="digits", type=dataset_arg, help=f"{DATASET_HELP} (default digits)"
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        metavar="N",
        help="image folders: resize every image to NxN (default: their own size, which must "
        "then be the same for all)",
    )
    p.add_argument(
        "--channels",
        type=int,
        choices=(1, 3),
        default=None,
        help="image folders: read images as grayscale (1) or RGB (3) (default: 1 when every "
        "image is grayscale, else 3)",
    )
    p.add_argument("--out", required=True, help="run directory to write (the model in --out/model)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128, help="global batch size")
    p.add_argument(
        "--lr", type=float, default=None, help="peak learning rate (default per optimizer)"
    )
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    p.add_argument("--schedule", choices=("cosine", "onecycle", "constant"), default="cosine")
    p.add_argument("--warmup-epochs", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm")
    p.add_argument("--amp", choices=("off", "auto", "bf16", "fp16"), default="auto")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument(
        "--bn-recalibration",
        type=int,
        default=0,
        metavar="N",
        help="at the end, re-estimate batch-norm statistics over N training batches with the "
        "weights fixed (default 0: keep the running averages)",
    )
    p.add_argument(
        "--augment",
        choices=("auto", "none", "crop", "flip", "crop+flip"),
        default="auto",
        help="on-device augmentation (auto: the dataset's default)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="hold out this fraction of the training set (stratified, fixed split) for the "
        "per-epoch evaluation, so that settings are chosen without the test set (without it "
        "the per-epoch evaluation, labelled test, runs on the test split)",
    )
    p.add_argument("--data-root", default=None, help="dataset folder (else $SLIMTORCH_DATA)")
    p.add_argument("--no-download", action="store_true", help="never download dataset files")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run --out already holds (its model, checkpoint and history) with a "
        "new one, and remove the run files it does not write again (an old report.json); "
        "without it (or --resume) such an --out is refused",
    )
    p.add_argument(
        "--checkpoint-every", type=int, default=0, help="also checkpoint every N steps (0: epochs)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--teacher",
        default=None,
        metavar="DIR",
        help="saved model directory to distil from (same dataset)",
    )
    p.add_argument(
        "--distill-temperature", type=float, default=None, help="with --teacher (default 4)"
    )
    p.add_argument(
        "--distill-alpha",
        type=float,
        default=None,
        help="with --teacher: weight of the soft loss (default 0.9)",
    )
    p.add_argument(
        "--sparse",
        choices=("rigl", "set", "static"),
        default=None,
        help="sparse training from scratch: RigL, SET or fixed random masks",
    )
    p.add_argument("--sparsity", type=float, default=None, help="with --sparse (default 0.9)")
    p.add_argument(
        "--sparse-distribution",
        choices=("erk", "uniform"),
        default=None,
        help="with --sparse: per-layer densities (default erk)",
    )
    p.add_argument(
        "--delta-t", type=int, default=None, help="with --sparse: steps between mask updates (100)"
    )
    p.add_argument(
        "--alpha", type=float, default=None, help="with --sparse: initial drop fraction (0.3)"
    )
    p.add_argument(
        "--t-end",
        type=float,
        default=None,
        help="with --sparse: fraction of training after which masks stop changing (0.75)",
    )
    p.add_argument(
        "--dense-init",
        action="store_true",
        help="with --sparse: keep the dense initial weights (default: each unit's remaining "
        "weights scaled to its sparse fan-in)",
    )
    add_device_args(p)
    p.set_defaults(handler=run)


def _augment(choice: str, dataset: str) -> Any:
    """``--augment`` as ``train_classifier`` takes it: crops are padded for the image size,
    which an image folder tells only once it is read."""
    from slimtorch.data import AugmentConfig
    from slimtorch.train.classifier import crop_padding

    if choice in ("auto", "none"):
        return "auto" if choice == "auto" else None

    def make(train_ds: Any) -> Any:
        pad = crop_padding(dataset, train_ds.input_shape[1]) if "crop" in choice else 0
        return AugmentConfig(random_crop_padding=pad, hflip="flip" in choice)

    return make


def _sparse_record(callbacks: list[Any], result: Any) -> dict[str, Any]:
    """What a sparse run ends with, for the summary line: method, sparsity of the sparse
    layers, mask updates made, and the fraction of their weights ever active (the masks'
    exploration; for fixed masks, their density)."""
    if not callbacks:
        return {}
    cb = callbacks[0]
    rows = cb.summary(result.model).values()
    density = sum(r["active"] for r in rows) / sum(r["numel"] for r in rows)
    updates = getattr(cb, "updates", [])
    explored = updates[-1]["explored"] if updates else density
    record = {"method": cb.kind, "sparsity": round(1 - density, 4), "mask_updates": len(updates)}
    return {"sparse": {**record, "explored": round(explored, 4)}}


def _sparse_callbacks(args: argparse.Namespace) -> list[Any]:
    if args.sparse is None:
        return []
    from slimtorch.sparse import make_sparse_callback

    return [
        make_sparse_callback(
            args.sparse,
            args.sparsity,
            distribution=args.sparse_distribution,
            delta_t=args.delta_t,
            alpha=args.alpha,
            t_end=args.t_end,
            seed=args.seed,
            scale_init=not args.dense_init,
        )
    ]


def _teacher_callbacks(args: argparse.Namespace, device: Any) -> Any:
    """A factory that loads ``--teacher`` once the data is known and checks that it fits."""
    from slimtorch.distill import DistillationCallback, DistillConfig, load_teacher

    config = DistillConfig(temperature=args.distill_temperature, alpha=args.distill_alpha)

    def make(train_ds: Any) -> list[Any]:
        teacher = load_teacher(
            args.teacher,
            input_shape=train_ds.input_shape,
            num_classes=len(train_ds.classes),
            device=device,
            classes=train_ds.classes,
            mean=train_ds.mean,
            std=train_ds.std,
        )
        return [DistillationCallback(teacher, config)]

    return make


def run(args: argparse.Namespace) -> int:
    from slimtorch.core.devices import resolve_device
    from slimtorch.data import dataset_record
    from slimtorch.train import BatchNormRecalibration, TrainConfig
    from slimtorch.train.classifier import train_classifier
    from slimtorch.train.distributed import cleanup, init_distributed, is_main_process

    options_that_need(args, args.teacher is not None, "--teacher", DISTILL_DEFAULTS)
    options_that_need(args, args.sparse is not None, "--sparse", SPARSE_DEFAULTS)
    if args.bn_recalibration < 0:
        raise ValueError(f"--bn-recalibration must be >= 0, got {args.bn_recalibration}")
    check_output_path(args.out, "--out", folder=True)
    replaced = check_run_output(
        args.out, overwrite=args.overwrite, resume=args.resume, checkpoint=True
    )
    with claim_run_folder(args.out):  # a second process writing --out fails at once
        if args.teacher is not None:
            model_dir_arg(args.teacher, "--teacher")
        distributed = init_distributed()
        try:
            apply_threads(args)
            device = resolve_device(args.device)
            lr = args.lr if args.lr is not None else (0.1 if args.optimizer == "sgd" else 1e-3)
            config = TrainConfig(
                epochs=args.epochs,
                optimizer=args.optimizer,
                lr=lr,
                schedule=args.schedule,
                warmup_epochs=args.warmup_epochs,
                weight_decay=args.weight_decay,
                label_smoothing=args.label_smoothing,
                grad_clip_norm=args.grad_clip,
                amp=args.amp,
                channels_last=args.channels_last,
                seed=args.seed,
                checkpoint_every_steps=args.checkpoint_every,
                progress=not args.no_progress,
            )
            teacher = _teacher_callbacks(args, device) if args.teacher else None
            sparse = _sparse_callbacks(args)

            recal = [BatchNormRecalibration(args.bn_recalibration)] if args.bn_recalibration else []

            def callbacks(train_ds: Any) -> list[Any]:
                return [*(teacher(train_ds) if teacher else ()), *sparse, *recal]

            result = train_classifier(
                model=args.model,
                dataset=args.dataset,
                out_dir=args.out,
                train_config=config,
                batch_size=args.batch_size,
                device=device,
                data_root=args.data_root,
                augment=_augment(args.augment, args.dataset),
                resume=args.resume,
                download=not args.no_download,
                callbacks=callbacks,
                val_fraction=args.val_fraction,
                channels=args.channels,
                image_size=args.image_size,
            )
            if is_main_process():
                summary = {
                    "model": args.model,
                    "dataset": dataset_record(args.dataset),
                    "test_accuracy": round(result.test_metrics["accuracy"], 4),
                    "test_loss": round(result.test_metrics["loss"], 4),
                    "train_seconds": round(result.train_seconds, 1),
                    **(
                        {"val_accuracy": round(result.val_metrics["accuracy"], 4)}
                        if result.val_metrics
                        else {}
                    ),
                    **_sparse_record(sparse, result),
                    "model_dir": str(result.model_dir),
                    "distributed": distributed,
                    **(
                        {"ranks_consistent": not result.replica_mismatches}
                        if result.replica_mismatches is not None
                        else {}
                    ),
                }
                print(json.dumps(summary))
                report_removed(remove_stale_outputs(replaced))
        finally:
            cleanup()
    return 0
