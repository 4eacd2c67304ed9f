"""Prune channels and fine-tune: the entries the compress pipeline and scripts call.

:func:`channel_prune_model` prunes a model in memory (Taylor importance reads the calibration
batches from the training loader) and fine-tunes it with the one
:class:`~slimtorch.train.Trainer`. :func:`prune_and_finetune` does the whole job on a model
directory, with the pieces :func:`slimtorch.train.classifier.train_classifier` uses
(dataset registry, :func:`~slimtorch.train.classifier.make_loaders`, the default augmentation,
the ``run_dir/model`` layout); ``train_classifier`` itself always builds a fresh model from a
registry name, so it cannot take a pruned one.

Example:
    >>> run = prune_and_finetune("runs/lenet", "runs/lenet-c50", ChannelPruneConfig(ratio=0.5),
    ...                          finetune=TrainConfig(epochs=2, lr=0.01))
    >>> run.accuracy["after_finetune"], run.report.to_dict()["totals"]["flops_ratio"]
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtorch.core.io import atomic_write_json
from slimtorch.data import ImageDataset, load_dataset
from slimtorch.models import load_model, save_model
from slimtorch.prune.channel.config import ChannelPruneConfig
from slimtorch.prune.channel.importance import LossFn
from slimtorch.prune.channel.report import ChannelPruneReport
from slimtorch.prune.channel.transform import prune_channels_
from slimtorch.train import Callback, TrainConfig, Trainer
from slimtorch.train.classifier import MODEL_SUBDIR, default_augment, make_loaders

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ChannelPruneResult:
    """What :func:`channel_prune_model` returns."""

    report: ChannelPruneReport
    history: dict[str, Any] | None


@dataclasses.dataclass
class ChannelPruneRun:
    """What :func:`prune_and_finetune` returns (``summary`` is what ``report.json`` holds)."""

    model: nn.Module
    report: ChannelPruneReport
    accuracy: dict[str, float]
    history: dict[str, Any] | None
    model_dir: Path | None
    summary: dict[str, Any]


def channel_prune_model(
    model: nn.Module,
    config: ChannelPruneConfig,
    example_input: Any,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    strict: bool = False,
    calibration: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    finetune: TrainConfig | None = None,
    train_loader: Any = None,
    val_loader: Any = None,
    device: str | torch.device = "cpu",
    out_dir: str | Path | None = None,
    callbacks: Sequence[Callback] = (),
) -> ChannelPruneResult:
    """Prune ``model``'s channels in place, then fine-tune it when asked.

    Args:
        model: The model (on ``device``).
        config: The pruning config.
        example_input: One input batch on the model's device (tracing and the forward check).
        include: Globs of layers whose output channels may be pruned.
        exclude: Globs of layers whose output channels stay.
        strict: Raise instead of recording skipped groups.
        calibration: ``(inputs, targets)`` batches for Taylor importance; defaults to
            ``train_loader`` when that is given.
        loss_fn: Loss for Taylor importance (cross-entropy when ``None``).
        finetune: Fine-tuning settings; ``None`` or ``epochs=0`` skips fine-tuning.
        train_loader: Training batches (needed to fine-tune).
        val_loader: Validation batches for the Trainer (optional).
        device: Where to fine-tune.
        out_dir: Run directory for the fine-tuning checkpoint and history.
        callbacks: Extra Trainer callbacks (distillation ...).

    Returns:
        The :class:`~.report.ChannelPruneReport` and the fine-tuning history (or ``None``).

    Raises:
        ValueError: Fine-tuning asked for without ``train_loader``.

    Example:
        >>> res = channel_prune_model(model, ChannelPruneConfig(ratio=0.3), x,
        ...                           finetune=TrainConfig(epochs=1), train_loader=loader)
    """
    will_finetune = finetune is not None and finetune.epochs > 0
    if will_finetune and train_loader is None:
        raise ValueError("fine-tuning needs train_loader=; pass one or set finetune=None")
    if calibration is None and config.importance == "taylor":
        calibration = train_loader
    report = prune_channels_(
        model,
        config,
        example_input,
        include=include,
        exclude=exclude,
        strict=strict,
        calibration=calibration,
        loss_fn=loss_fn,
    )
    logger.info("channel pruning:\n%s", report.to_table())
    history = None
    if will_finetune and report.pruned:
        assert finetune is not None
        trainer = Trainer(model, finetune, device=device, out_dir=out_dir, callbacks=callbacks)
        history = trainer.fit(train_loader, val_loader).to_dict()
    elif will_finetune:
        logger.info("no channel was pruned; skipping fine-tuning")
    return ChannelPruneResult(report, history)


def _subset(ds: ImageDataset, limit: int | None) -> ImageDataset:
    if limit is None or limit >= len(ds.labels):
        return ds
    return ImageDataset(
        name=ds.name,
        images=ds.images[:limit],
        labels=ds.labels[:limit],
        classes=ds.classes,
        mean=ds.mean,
        std=ds.std,
    )


def _accuracy(model: nn.Module, loader: Any, device: torch.device) -> float:
    cfg = TrainConfig(epochs=1, progress=False)
    acc = Trainer(model, cfg, device=device).evaluate(loader)["accuracy"]
    return float("nan") if acc is None else float(acc)


def prune_and_finetune(
    in_dir: str | Path,
    out_dir: str | Path | None,
    config: ChannelPruneConfig,
    *,
    finetune: TrainConfig | None = None,
    dataset: str | None = None,
    data_root: str | Path | None = None,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    strict: bool = False,
    example_batch: int = 8,
    train_limit: int | None = None,
    test_limit: int | None = None,
) -> ChannelPruneRun:
    """Prune the model directory ``in_dir``, fine-tune it, and save ``out_dir/model``.

    Test accuracy is measured before pruning, after it and after fine-tuning;
    ``out_dir/report.json`` holds them with the pruning report and the fine-tuning history.

    Args:
        in_dir: A model directory (or a run directory holding one in ``model/``).
        out_dir: Run directory for the result; ``None`` keeps nothing on disk.
        config: The pruning config.
        finetune: Fine-tuning settings (``None`` or ``epochs=0``: prune only).
        dataset: Dataset name (default: the one recorded in the model directory).
        data_root: Dataset folder (else ``SLIMTORCH_DATA``, the cache, download).
        batch_size: Fine-tuning batch size.
        device: Where to prune, fine-tune and evaluate.
        include: Globs of layers whose output channels may be pruned.
        exclude: Globs of layers whose output channels stay.
        strict: Raise instead of recording skipped groups.
        example_batch: Batch size of the random example input used for tracing.
        train_limit: Use only the first this many training images (quick runs).
        test_limit: Use only the first this many test images.

    Returns:
        A :class:`ChannelPruneRun`.

    Raises:
        ValueError: The dataset is unknown to the model directory and not given, or its
            image shape differs from the model's.

    Example:
        >>> run = prune_and_finetune("runs/resnet20", "runs/r20-c30",
        ...                          ChannelPruneConfig(ratio=0.3, importance="taylor"),
        ...                          finetune=TrainConfig(epochs=5, lr=0.01), device="cuda")
    """
    dev = torch.device(device)
    in_path = Path(in_dir)
    if not (in_path / "config.json").is_file() and (in_path / MODEL_SUBDIR).is_dir():
        in_path = in_path / MODEL_SUBDIR
    model, card = load_model(in_path, device=dev)
    name = dataset or card.extra.get("dataset")
    if not name:
        raise ValueError(f"{in_path} does not record its dataset; pass dataset=...")
    train_ds = _subset(load_dataset(name, "train", root=data_root), train_limit)
    test_ds = _subset(load_dataset(name, "test", root=data_root), test_limit)
    shape = tuple(card.input_shape)
    if tuple(test_ds.input_shape) != shape:
        raise ValueError(f"{name} images are {test_ds.input_shape}, the model expects {shape}")
    seed = finetune.seed if finetune is not None else 0
    train_loader, test_loader = make_loaders(
        train_ds,
        test_ds,
        batch_size=batch_size,
        device=dev,
        augment=default_augment(name),
        seed=seed,
    )
    acc_before = _accuracy(model, test_loader, dev)
    example = torch.randn(example_batch, *shape, device=dev)
    t0 = time.perf_counter()
    result = channel_prune_model(
        model,
        config,
        example,
        include=include,
        exclude=exclude,
        strict=strict,
        calibration=train_loader if config.importance == "taylor" else None,
    )
    prune_s = time.perf_counter() - t0
    acc_pruned = _accuracy(model, test_loader, dev)
    history = None
    if finetune is not None and finetune.epochs > 0 and result.report.pruned:
        trainer = Trainer(model, finetune, device=dev, out_dir=out_dir)
        history = trainer.fit(train_loader, test_loader).to_dict()
    acc_after = _accuracy(model, test_loader, dev) if history is not None else acc_pruned
    accuracy = {"before": acc_before, "after_prune": acc_pruned, "after_finetune": acc_after}
    summary: dict[str, Any] = {
        "method": "channel-prune",
        "config": config.to_dict(),
        "dataset": name,
        "source": str(in_path),
        "device": str(dev),
        "prune_seconds": prune_s,
        "accuracy": accuracy,
        "pruning": result.report.to_dict(),
        "finetune": None if finetune is None else finetune.to_dict(),
        "history": history,
    }
    model_dir = None
    if out_dir is not None:
        out = Path(out_dir)
        model_dir = save_model(
            model,
            out / MODEL_SUBDIR,
            input_shape=shape,  # type: ignore[arg-type]
            mean=card.mean,
            std=card.std,
            class_names=card.class_names,
            metrics={"test_accuracy": acc_after, "test_accuracy_before": acc_before},
            extra={**card.extra, "compressed_from": str(in_path), "method": "channel-prune"},
        )
        atomic_write_json(out / "report.json", summary)
    return ChannelPruneRun(model, result.report, accuracy, history, model_dir, summary)
