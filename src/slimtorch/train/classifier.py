"""Train and evaluate an image classifier from the registries: the job behind ``slimtorch train``.

It wires the data layer (device-resident loaders), the model zoo, the one :class:`Trainer` and the
model directory format together, so the CLI stays a thin parser and Python users get the same
job with one call.

Example:
    >>> import tempfile, pathlib; d = pathlib.Path(tempfile.mkdtemp())
    >>> cfg = TrainConfig(epochs=3, lr=0.1, progress=False)
    >>> result = train_classifier(model="mlp", dataset="digits", out_dir=d / "demo",
    ...                           train_config=cfg)
    >>> sorted(p.name for p in (d / "demo").iterdir())
    ['checkpoint.pt', 'history.json', 'model', 'train_config.json']
    >>> result.model_dir == d / "demo" / "model", len(result.history["epoch"])
    (True, 3)
    >>> result.test_metrics["accuracy"] > 0.8
    True
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtorch.core.devices import resolve_device
from slimtorch.data import (
    AugmentConfig,
    DeviceLoader,
    ImageDataset,
    dataset_record,
    is_image_folder,
    load_dataset,
    split_dataset,
)
from slimtorch.models import create_model, save_model
from slimtorch.models.card import WEIGHTS_FILE
from slimtorch.train.callbacks import Callback
from slimtorch.train.config import TrainConfig
from slimtorch.train.distributed import (
    data_parallel,
    get_device_index,
    get_rank,
    get_world_size,
    is_main_process,
)
from slimtorch.train.seeding import seed_everything
from slimtorch.train.trainer import Trainer
from slimtorch.train.trainer_state import run_record

logger = logging.getLogger(__name__)

MODEL_SUBDIR = "model"
"""A run directory keeps its model directory here (beside checkpoint.pt and history.json)."""

RUN_FILES = (
    "checkpoint.pt",
    "history.json",
    "train_config.json",
    "report.json",
    "report.txt",
    "report.refused.json",
    "report.refused.txt",
    "checkpoint.refused.pt",  # a refused compress run's fine-tune files, beside a kept model
    "history.refused.json",
    "train_config.refused.json",
    "model.compact.safetensors",
)
"""The files train and compress write in ``--out`` beside ``model/``."""


def file_identity(path: Path) -> tuple[int, int]:
    """``(inode, mtime)``: an atomic write of the same name gives a new one."""
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


def run_files(out: Path) -> dict[Path, tuple[int, int]]:
    """The run files (:data:`RUN_FILES`) in ``out`` with their :func:`file_identity`."""
    return {p: file_identity(p) for p in (out / name for name in RUN_FILES) if p.is_file()}


def model_identity(out: Path) -> tuple[int, int] | None:
    """The :func:`file_identity` of the weights in ``out``'s model directory (None: none),
    which changes when a save's swap has landed a new model there."""
    weights = out / MODEL_SUBDIR / WEIGHTS_FILE
    return file_identity(weights) if weights.is_file() else None


def remove_stale_outputs(before: dict[Path, tuple[int, int]]) -> list[str]:
    """Remove the run files of a replaced run that the new run left as they were.

    ``before`` is what :func:`run_files` returned before the new run. A file the new run wrote
    again (the atomic writes give it a new inode) is kept. Returns the names removed.
    """
    removed = []
    for path, identity in before.items():
        if path.is_file() and file_identity(path) == identity:
            path.unlink()
            removed.append(path.name)
    return removed


# Augmentation that suits each dataset: digits and letters must not be mirrored; clothing and
# CIFAR objects may be. The 8x8 digits are too small to crop.
_DEFAULT_AUGMENT: dict[str, AugmentConfig | None] = {
    "digits": None,
    "mnist": AugmentConfig(random_crop_padding=2),
    "kmnist": AugmentConfig(random_crop_padding=2),
    "fashion-mnist": AugmentConfig(random_crop_padding=2, hflip=True),
    "cifar10": AugmentConfig(random_crop_padding=4, hflip=True),
}


def crop_padding(dataset: str, size: int) -> int:
    """Random-crop padding for ``dataset``'s images of side ``size``: CIFAR's 4 pixels, 2 for
    the 28-pixel sets, and an eighth of the side (CIFAR's ratio) for an image folder."""
    if is_image_folder(dataset):
        return min(64, max(1, round(size / 8)))  # 64: AugmentConfig's bound
    return 4 if dataset == "cifar10" else 2


def default_augment(dataset: str, size: int | None = None) -> AugmentConfig | None:
    """The augmentation ``train_classifier`` uses for ``dataset`` when none is given.

    An image folder of side ``size`` gets random crops (:func:`crop_padding`) and no flips:
    its classes may not survive mirroring (text, signs, digits).
    """
    if is_image_folder(dataset):
        return (
            None if size is None else AugmentConfig(random_crop_padding=crop_padding(dataset, size))
        )
    return _DEFAULT_AUGMENT.get(dataset)


@dataclass
class ClassifierRun:
    """What :func:`train_classifier` returns."""

    model: nn.Module
    history: dict[str, Any]
    test_metrics: dict[str, float]
    model_dir: Path | None
    train_seconds: float
    val_metrics: dict[str, float] | None = None
    """Final metrics on the held-out validation split (``val_fraction``), else None."""
    replica_mismatches: list[str] | None = None
    """Data-parallel runs: tensors that differ between ranks at the end ([]: none)."""


def make_loaders(
    train_ds: ImageDataset,
    test_ds: ImageDataset,
    *,
    batch_size: int,
    device: torch.device,
    augment: AugmentConfig | None,
    seed: int,
    eval_batch_size: int = 1024,
    channels_last: bool = False,
) -> tuple[DeviceLoader, DeviceLoader]:
    """Device-resident train/test loaders; the train loader is sharded across DDP ranks.

    ``batch_size`` is the global batch: each of ``world_size`` ranks gets an equal share.
    """
    world = get_world_size()
    if batch_size % world:
        raise ValueError(
            f"batch_size must be divisible by the number of processes ({world}), got {batch_size}"
        )
    train_loader = DeviceLoader(
        train_ds,
        batch_size // world,
        shuffle=True,
        drop_last=True,
        device=device,
        augment=augment,
        seed=seed,
        rank=get_rank(),
        world_size=world,
        channels_last=channels_last,
    )
    if len(train_loader) == 0:  # batches are full (drop_last): a batch past the split is none
        share = f", {len(train_ds) // world} per process" if world > 1 else ""
        raise ValueError(
            f"batch_size {batch_size} is larger than the {len(train_ds)} training images of "
            f"{train_ds.name}{share}; give a batch size of at most that"
        )
    return train_loader, eval_loader(test_ds, device, eval_batch_size, channels_last)


def eval_loader(
    ds: ImageDataset, device: torch.device, batch_size: int = 1024, channels_last: bool = False
) -> DeviceLoader:
    """An evaluation loader (no shuffling or augmentation), sharded across DDP ranks."""
    return DeviceLoader(
        ds,
        batch_size,
        device=device,
        channels_last=channels_last,
        rank=get_rank(),
        world_size=get_world_size(),
    )


def train_classifier(
    *,
    model: str,
    dataset: str | os.PathLike[str],
    out_dir: str | Path | None,
    train_config: TrainConfig,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    data_root: str | Path | None = None,
    augment: AugmentConfig | str | Callable[[ImageDataset], AugmentConfig | None] | None = "auto",
    model_kwargs: dict[str, Any] | None = None,
    callbacks: Sequence[Callback] | Callable[[ImageDataset], Sequence[Callback]] = (),
    resume: bool = False,
    download: bool = True,
    val_fraction: float | None = None,
    val_seed: int = 0,
    channels: int | None = None,
    image_size: int | None = None,
) -> ClassifierRun:
    """Train ``model`` on ``dataset``, evaluate on its test split, save a model directory.

    Args:
        model: A registered model name (see ``slimtorch.models.list_models()``).
        dataset: A registered dataset name (see ``slimtorch.data.list_datasets()``), or an
            image folder's path (``train/`` and ``test/`` class folders; see
            :mod:`slimtorch.data.folder_dataset`); the model card records the folder's
            absolute path.
        out_dir: The run directory: checkpoint, history and resolved configs go here, the
            model directory goes to ``out_dir/model`` (None: keep nothing).
        train_config: Optimiser, schedule, epochs, AMP and the rest.
        batch_size: Global batch size (split across DDP processes).
        device: Torch device to train on.
        data_root: Explicit dataset folder (else ``SLIMTORCH_DATA``, the cache, download).
        augment: An :class:`AugmentConfig`, None for none, ``"auto"`` for the dataset default
            (:func:`default_augment`), or a function of the training dataset that returns one.
        model_kwargs: Extra architecture arguments (``width_mult``, ``hidden`` ...).
        callbacks: Extra Trainer callbacks (QAT, pruning masks, distillation ...), or a
            function of the training dataset that returns them (called once the data is
            loaded, e.g. to check that a distillation teacher fits its shape and classes).
        resume: Continue from ``out_dir/checkpoint.pt``.
        download: Allow downloading missing dataset files.
        val_fraction: Hold out this fraction of the training split (stratified by class) as
            a validation set: the per-epoch evaluation then runs on it instead of the test
            split, so hyperparameters can be chosen without looking at the test set. The test
            split is still evaluated once at the end.
        val_seed: Seed of that split; keep it fixed to compare runs on the same validation set.
        channels: Image folders: read images with 1 or 3 channels (default: 1 when every
            image is grayscale, else 3). A catalog dataset of other images is refused.
        image_size: Image folders: resize every image to this square side (default: their
            own size, which must be square and the same for all).
    """
    device = resolve_device(device, any_index=data_parallel())
    if device.type == "cuda" and data_parallel():
        device = torch.device("cuda", get_device_index())  # one GPU per DDP process
    dataset = dataset_record(dataset)  # an image folder: its absolute path
    train_ds = load_dataset(
        dataset, "train", root=data_root, download=download, channels=channels, size=image_size
    )
    c, h, w = train_ds.input_shape
    test_ds = load_dataset(
        dataset, "test", root=data_root, download=download, channels=c, size=(h, w)
    )
    # an image folder's test split is normalised as its training split (catalog: the same)
    test_ds = replace(test_ds, mean=train_ds.mean, std=train_ds.std)
    val_ds = None
    if val_fraction is not None:
        train_ds, val_ds = split_dataset(train_ds, val_fraction, seed=val_seed)
    chosen = augment(train_ds) if callable(augment) else augment
    if chosen == "auto":
        chosen = default_augment(dataset, h)
    if not (chosen is None or isinstance(chosen, AugmentConfig)):
        raise ValueError(f"augment must be an AugmentConfig, None or 'auto', got {chosen!r}")
    aug: AugmentConfig | None = chosen
    if tuple(test_ds.input_shape) != tuple(train_ds.input_shape) or len(test_ds.classes) != len(
        train_ds.classes
    ):
        raise ValueError(
            f"the {dataset} test split has images {tuple(test_ds.input_shape)} and "
            f"{len(test_ds.classes)} classes, the train split {tuple(train_ds.input_shape)} and "
            f"{len(train_ds.classes)}; both splits must come from the same dataset"
        )
    if h != w:
        raise ValueError(
            f"only square inputs are supported by the model zoo, got {h}x{w}; resize an image "
            "folder with image_size= (slimtorch train: --image-size N)"
        )
    # the seed fixes the initial weights too: the same on every rank and in every rerun
    seed_everything(train_config.seed)
    net = create_model(
        model,
        num_classes=len(train_ds.classes),
        in_channels=c,
        input_size=h,
        **(model_kwargs or {}),
    )
    train_loader, test_loader = make_loaders(
        train_ds,
        test_ds,
        batch_size=batch_size,
        device=device,
        augment=aug,
        seed=train_config.seed,
        channels_last=train_config.channels_last,
    )
    val_loader = None
    if val_ds is not None:
        val_loader = eval_loader(val_ds, device, channels_last=train_config.channels_last)
    cbs = callbacks(train_ds) if callable(callbacks) else callbacks
    trainer = Trainer(net, train_config, device=device, callbacks=cbs, out_dir=out_dir)
    trainer.run_info = {
        "model": model if isinstance(model, str) else type(model).__name__,
        # the architecture as built (defaults included): another width or dropout is refused
        "model_kwargs": dict(getattr(net, "slimtorch_arch", {}).get("kwargs", {})),
        "dataset": dataset,
        "input_shape": [c, h, w],  # an image folder is read at the size asked for
        "mean": list(train_ds.mean),
        "std": list(train_ds.std),
        "batch_size": batch_size,
        "augment": None if aug is None else aug.to_dict(),
        "val_fraction": val_fraction,
        "val_seed": val_seed if val_fraction is not None else None,
    }
    if val_loader is None:
        trainer.eval_name = "test"  # the per-epoch evaluation runs on the test split
    history = trainer.fit(train_loader, val_loader or test_loader, resume=resume)
    seconds = trainer.train_seconds  # with the run it resumed, if any

    def final(loader: DeviceLoader) -> dict[str, float]:
        metrics = trainer.evaluate(loader)
        return {"accuracy": float(metrics["accuracy"]), "loss": float(metrics["loss"])}

    test_metrics = final(test_loader)
    val_metrics = final(val_loader) if val_loader is not None else None
    model_dir = None
    if out_dir is not None and is_main_process():
        model_dir = save_model(
            trainer.unwrapped_model,
            Path(out_dir) / MODEL_SUBDIR,
            input_shape=(c, h, w),
            mean=train_ds.mean,
            std=train_ds.std,
            class_names=list(train_ds.classes),
            metrics={
                "test_accuracy": test_metrics["accuracy"],
                "test_loss": test_metrics["loss"],
                "train_seconds": seconds,
                "epochs": train_config.epochs,
                **(
                    {}
                    if val_metrics is None
                    else {"val_accuracy": val_metrics["accuracy"], "val_loss": val_metrics["loss"]}
                ),
                **(
                    {}
                    if trainer.replica_mismatches is None
                    else {"ranks_consistent": not trainer.replica_mismatches}
                ),
            },
            extra={
                "dataset": dataset,
                "train_config": train_config.to_dict(),
                "batch_size": batch_size,
                "augment": None if aug is None else aug.to_dict(),
                "device": str(device),
                "world_size": get_world_size(),
                "val_fraction": val_fraction,
                "val_seed": val_seed if val_fraction is not None else None,
                # what shaped the weights beyond train_config: sparse training, distillation
                # and its teacher, batch-norm recalibration ... (as the checkpoint records it)
                "run": run_record(trainer),
            },
        )
    return ClassifierRun(
        model=trainer.unwrapped_model,
        history=history.to_dict(),
        test_metrics=test_metrics,
        model_dir=model_dir,
        train_seconds=seconds,
        val_metrics=val_metrics,
        replica_mismatches=trainer.replica_mismatches,
    )
