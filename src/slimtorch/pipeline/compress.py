"""Compress a trained model directory, fine-tune it, and report before/after.

The job behind ``slimtorch compress``: load a model directory, measure it (test accuracy,
parameters, size, FLOPs, measured latency and peak memory on the device at hand, roofline
estimate on the target profiles), apply a method from
:data:`~slimtorch.pipeline.methods.COMPRESS_METHODS` (decomposition, pruning, quantization ...),
fine-tune with the one Trainer and the callbacks the method asks for, run the method's finishing
step, measure again and write a model directory plus ``report.json``. A change is only called
faster when the measured latency says so: the report ends with a verdict
(:mod:`slimtorch.pipeline.verdict`) built from side-by-side timings alone.

Example (needs a model directory written by ``slimtorch train``, hence skipped as a test):
    >>> res = compress_run(in_dir="runs/base", out_dir="runs/tucker", method="tucker",
    ...                    rank=0.25, finetune=TrainConfig(epochs=3, lr=0.01))  # doctest: +SKIP
    >>> text = res.table  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtorch.core.config import check_bool
from slimtorch.core.devices import keeps_rng, resolve_device
from slimtorch.core.io import atomic_write_json, atomic_write_text, fsync_dir
from slimtorch.core.measure import ModelProfile, profile_model
from slimtorch.data import DeviceLoader, ImageDataset, dataset_record
from slimtorch.distill import DistillationCallback, DistillConfig
from slimtorch.models import load_model, save_model
from slimtorch.models.card import model_root
from slimtorch.pipeline.methods import (
    COMPRESS_METHODS,
    MethodRequest,
    check_options,
    file_bytes,
    warn_folded,
)
from slimtorch.pipeline.report_table import finish_rows, report_table
from slimtorch.pipeline.side_by_side import side_by_side
from slimtorch.pipeline.verdict import finish_timings, make_verdict, speed_entry
from slimtorch.prune import MaskCallback
from slimtorch.prune.buffers import masked_params
from slimtorch.quant.precision import hand_mixed_dtypes
from slimtorch.train import (
    BatchNormRecalibration,
    Callback,
    TrainConfig,
    Trainer,
    check_trains_on_one_sample,
)
from slimtorch.train.classifier import (
    MODEL_SUBDIR,
    default_augment,
    make_loaders,
    model_identity,
    remove_stale_outputs,
    run_files,
)
from slimtorch.train.distributed import (
    data_parallel,
    get_device_index,
    get_rank,
    get_world_size,
    is_main_process,
)

logger = logging.getLogger(__name__)


@dataclass
class CompressResult:
    """What :func:`compress_run` returns; ``report`` is what ``report.json`` holds."""

    model: nn.Module
    report: dict[str, Any]
    table: str
    model_dir: Path | None
    report_path: Path | None = None


def measure_model(
    model: nn.Module,
    test_loader: DeviceLoader,
    input_shape: Sequence[int],
    *,
    device: torch.device,
    batch_size: int,
    profiles: Sequence[str],
    threads: int | None,
) -> tuple[float, ModelProfile]:
    """Test accuracy plus the measurement profile at ``batch_size`` (one call, one device)."""
    model.eval()
    trainer = Trainer(model, TrainConfig(epochs=1, progress=False), device=device)
    try:
        acc = trainer.evaluate(test_loader)["accuracy"]
    except RuntimeError as exc:  # torch's dtype clashes all say "type" (as profile reads them)
        if "type" not in str(exc).lower() or not (mixed := hand_mixed_dtypes(model)):
            raise
        why = f"the model's weights mix {', '.join(mixed)} with no casts between the layers"
        raise ValueError(f"{why}; load it, call model.float() and save it again") from None
    x = torch.randn(batch_size, *input_shape, device=device)
    prof = profile_model(model, x, device=device, profiles=list(profiles), threads=threads)
    return float(acc if acc is not None else float("nan")), prof


def example_images(dataset: ImageDataset, batch: int, device: torch.device) -> torch.Tensor:
    """The first ``batch`` test images, as the model sees them (normalised), repeated when the
    split is smaller: the example batch every method times and checks outputs on. Real images
    keep int8 activations inside their calibrated ranges, where random inputs are not (the
    runtime check's int8 difference on resnet20 read 0.3 or 6.3 on two random batches).

    Example:
        >>> from slimtorch.data import load_dataset
        >>> x = example_images(load_dataset("digits", "test"), 500, torch.device("cpu"))
        >>> tuple(x.shape), bool(torch.equal(x[:2], x[len(load_dataset("digits", "test")):][:2]))
        ((500, 1, 8, 8), True)
    """
    n = min(batch, len(dataset))
    x, _ = next(iter(DeviceLoader(dataset, n, device=device)))
    if n < batch:
        x = x.repeat((-(-batch // n),) + (1,) * (x.ndim - 1))[:batch]
    return x.contiguous()


def _guard(acc_before: float, acc_after: float, max_drop: float | None) -> dict[str, Any] | None:
    """The accuracy guard's verdict (points lost against ``max_drop``), None without a guard."""
    if max_drop is None:
        return None
    drop = 100.0 * (acc_before - acc_after)
    return {"max_drop_points": float(max_drop), "drop_points": drop, "passed": drop <= max_drop}


FINETUNE_STAGE = ".finetune"
"""Folder of the run directory the fine-tune writes its checkpoint and history into; they move
up beside the model once the accuracy guard has passed."""


def _land_finetune_files(out: Path, suffix: str) -> None:
    """Move the fine-tune's files from the stage up into ``out`` (``checkpoint.pt`` ...), or,
    for a run the guard refused over an earlier model, beside that model's own files as
    ``checkpoint.refused.pt`` ...: an earlier run's checkpoint and history are never replaced
    by those of a model that was not written."""
    stage = out / FINETUNE_STAGE
    if not stage.is_dir():
        return
    for f in stage.iterdir():
        os.replace(f, out / f"{f.stem}{suffix}{f.suffix}")
    stage.rmdir()
    fsync_dir(out)


@keeps_rng  # the caller's torch generators are given back as they were
def compress_run(
    *,
    in_dir: str | Path,
    out_dir: str | Path | None,
    method: str,
    rank: float | int | str | None = None,
    method_options: dict[str, Any] | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    strict: bool = False,
    finetune: TrainConfig | None = None,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    data_root: str | Path | None = None,
    dataset: str | os.PathLike[str] | None = None,
    profile_batch: int = 32,
    profiles: Sequence[str] = ("rx580",),
    threads: int | None = None,
    distill: DistillConfig | None = None,
    max_drop: float | None = None,
    bn_recalibration: int = 100,
    seed: int | None = None,
) -> CompressResult:
    """Compress the model in ``in_dir`` with ``method``, fine-tune it, measure before and after.

    Args:
        in_dir: A model directory (or a run directory holding one in ``model/``).
        out_dir: Run directory for the result (``model/``, ``report.json``, fine-tune
            checkpoint and history); None keeps nothing on disk.
        method: A name in :data:`~slimtorch.pipeline.methods.COMPRESS_METHODS` (``svd``,
            ``tucker``, ``cp``, ``tt``, ``prune``, ``nm`` ...).
        rank: Rank spec of the decomposition methods (a fraction in (0, 1], an int, or a
            string such as ``"vbmf"``); same as ``method_options["rank"]``.
        method_options: Fields of the method's config (``round_to``, ``sparsity`` ...).
        include: Dotted-name globs of the layers to consider (all when None).
        exclude: Dotted-name globs to leave alone.
        strict: Raise instead of recording skipped layers.
        finetune: Fine-tuning settings; None skips fine-tuning.
        batch_size: Fine-tuning batch size.
        device: Where to fine-tune and measure.
        data_root: Dataset folder (else ``SLIMTORCH_DATA``, the cache, download).
        dataset: Dataset name or image folder (default: the one recorded in the model
            directory); read at the model's input shape and normalised as it was trained.
        profile_batch: Batch size of the latency and memory measurements (>= 1).
        profiles: Device profiles to estimate latency on.
        threads: CPU threads for the measurements.
        distill: When given and fine-tuning runs, fine-tune by distillation from a frozen
            copy of the model taken before the transform (Hinton et al. 2015,
            arXiv:1503.02531); ``report.json`` records it under ``"distill"`` (None when no
            distillation ran).
        max_drop: Accuracy guard, in percentage points: when the test accuracy after the
            method (and fine-tuning) is more than this below the accuracy before, the model is
            not written (``report.json`` is, with ``accuracy_guard.passed`` false, and the
            result's ``model_dir`` is None). None: no guard.
        bn_recalibration: After fine-tuning, re-estimate the batch norms' running statistics
            over this many training batches with the final weights
            (:class:`~slimtorch.train.BatchNormRecalibration`; a short fine-tune of a freshly
            compressed model otherwise leaves statistics of weights that no longer exist). 0
            turns it off; ``report.json`` records what ran under ``"bn_recalibration"``.
        seed: Seed of the data order, the calibration batches and the fine-tune (None:
            ``finetune.seed``, else 0); recorded in ``report.json``. Given with ``finetune``,
            the two must agree. A fine-tune seeds the process's generators with it; torch's
            are given back as they were when the run returns.

    Raises:
        ValueError: Unknown method (the message lists the valid ones) or a bad option.
    """
    check_bool("compress_run", "strict", strict)
    for arg, value, low in (("profile_batch", profile_batch, 1), ("batch_size", batch_size, 1),
                            ("bn_recalibration", bn_recalibration, 0)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{arg} must be an int >= {low}, got {value!r}")
    if max_drop is not None and (
        isinstance(max_drop, bool) or not isinstance(max_drop, int | float) or not max_drop >= 0
    ):
        raise ValueError(f"max_drop must be a number of points >= 0 or None, got {max_drop!r}")
    if distill is not None and not isinstance(distill, DistillConfig):
        raise TypeError(f"distill must be a DistillConfig or None, got {type(distill).__name__}")
    if finetune is not None and not isinstance(finetune, TrainConfig):
        raise TypeError(f"finetune must be a TrainConfig or None, got {type(finetune).__name__}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an int or None, got {seed!r}")
    if method_options is not None and not isinstance(method_options, dict):
        raise TypeError(
            f"method_options must be a dict of option names to values or None, got "
            f"{type(method_options).__name__} {method_options!r}"
        )
    if isinstance(profiles, str):
        raise TypeError(
            f"profiles must be a list of device profile names, got the string {profiles!r}; "
            f"pass [{profiles!r}]"
        )
    apply = COMPRESS_METHODS.get(method)
    options = dict(method_options or {})
    if rank is not None:
        options["rank"] = rank
    check_options(method, options)  # a bad option fails before the model and data are loaded
    device = resolve_device(device, any_index=data_parallel())  # DDP maps it below
    if device.type == "cuda" and data_parallel():
        device = torch.device("cuda", get_device_index())  # one GPU per DDP process
    in_path = model_root(in_dir)
    model, card = load_model(in_path, device=device)
    name = dataset_record(dataset) if dataset else card.dataset
    if not name:
        raise ValueError(f"{in_path} does not record its dataset; pass dataset= (--dataset)")
    recorded = card.dataset
    if dataset and recorded and name != recorded:
        logger.warning(
            "%s was trained on %s; measuring and fine-tuning it on %s as asked",
            in_path, recorded, name,
        )  # fmt: skip
    # read at the model's input shape, normalised as the model was trained
    test_ds: ImageDataset = card.load_split("test", dataset=name, root=data_root)
    shape = tuple(card.input_shape)
    if seed is None:
        seed = 0 if finetune is None else finetune.seed
    elif finetune is not None and finetune.seed != seed:
        raise ValueError(f"seed={seed} differs from finetune.seed={finetune.seed}; give one")
    loaders: tuple[DeviceLoader, DeviceLoader] | None = None

    def both_loaders() -> tuple[DeviceLoader, DeviceLoader]:
        nonlocal loaders
        if loaders is None:  # sharded across DDP ranks (batch_size is the global batch)
            train = card.load_split("train", dataset=name, root=data_root)
            loaders = make_loaders(
                train,
                test_ds,  # only calibrating (no fine-tune): a small split is one short batch
                batch_size=batch_size if will_finetune else min(batch_size, len(train)),
                device=device,
                augment=default_augment(name, shape[1]),
                seed=seed,
            )
        return loaders

    def train_batches() -> DeviceLoader:
        return both_loaders()[0]

    def calibration_batches() -> DeviceLoader:
        """Every rank sees the same batches: calibration scales, importance scores and the
        like then agree across ranks (each rank's own shard made them differ)."""
        loader = train_batches()
        if loader.world_size == 1:
            return loader
        whole = copy.copy(loader)  # (shares the device-resident images once loaded)
        whole.rank, whole.world_size = 0, 1
        return whole

    test_loader = DeviceLoader(
        test_ds, 1024, device=device, rank=get_rank(), world_size=get_world_size()
    )
    acc0, prof0 = measure_model(
        model,
        test_loader,
        shape,
        device=device,
        batch_size=profile_batch,
        profiles=profiles,
        threads=threads,
    )
    if will_finetune := finetune is not None and finetune.epochs > 0:
        warn_folded(card.transforms)
        if batch_size // get_world_size() == 1:  # fails on its first step, after the transform
            check_trains_on_one_sample(model, example_images(test_ds, 1, device))

    steps_per_epoch = len(train_batches()) if will_finetune else 0
    teacher = copy.deepcopy(model) if distill is not None and will_finetune else None
    example = example_images(test_ds, profile_batch, device)
    request = MethodRequest(
        options=options,
        include=include,
        exclude=exclude,
        strict=strict,
        example_input=example,
        calibration=calibration_batches,
        finetune_steps=steps_per_epoch * (finetune.epochs if finetune is not None else 0),
        steps_per_epoch=steps_per_epoch,
        threads=threads,
    )
    # the model as it was, timed against the result side by side at the end
    original = copy.deepcopy(model)
    t0 = time.perf_counter()
    applied = apply(model, request)
    transform_s = time.perf_counter() - t0
    logger.info("%s, as applied before any fine-tuning:\n%s", method, applied.table)
    acc_mid = measure_model(
        model, test_loader, shape, device=device, batch_size=1, profiles=(), threads=threads
    )[0]

    history: dict[str, Any] | None = None
    if not applied.changed:
        logger.info("the method changed no layer; skipping fine-tuning")
    if distill is not None and not will_finetune:
        logger.info("distillation needs fine-tuning epochs; none were asked for")
    callbacks: list[Callback] = list(applied.callbacks)
    if masked_params(model) and not any(isinstance(c, MaskCallback) for c in callbacks):
        callbacks.append(MaskCallback())  # a pruned input's zeros stay zero through the fine-tune
    if teacher is not None and distill is not None:
        callbacks.append(DistillationCallback(teacher, distill))
    recal = BatchNormRecalibration(bn_recalibration) if bn_recalibration else None
    if recal is not None:
        callbacks.append(recal)
    if applied.changed and not applied.trainable and will_finetune:
        logger.info("%s is applied after training; skipping fine-tuning", method)
    stage = None if out_dir is None else Path(out_dir) / FINETUNE_STAGE
    if stage is not None and stage.exists() and is_main_process():
        # files of a run that stopped before its end: never landed as this run's
        logger.info("removing %s, left by an interrupted run", stage)
        shutil.rmtree(stage)
    if applied.changed and applied.trainable and finetune is not None and will_finetune:
        trainer = Trainer(model, finetune, device=device, out_dir=stage, callbacks=callbacks)
        trainer.eval_name = "test"  # the per-epoch evaluation runs on the test split
        history = trainer.fit(train_batches(), test_loader).to_dict()
    finished = applied.finish(model) if applied.finish is not None else None
    acc1, prof1 = measure_model(
        model,
        test_loader,
        shape,
        device=device,
        batch_size=profile_batch,
        profiles=profiles,
        threads=threads,
    )
    side = side_by_side(original, model, (profile_batch, *shape), device, threads)
    saved_before = file_bytes(original)  # the files' sizes, headers included
    del original
    storage = (finished or {}).get("storage")  # pruned: zeros cost nothing in the compact file
    saved_after = storage["compact_bytes"] if storage else file_bytes(model)
    compact = bool(storage) or bool(masked_params(model))  # a pruned input still holds masks
    timings = [
        speed_entry(
            f"{device.type} batch {profile_batch}",
            side["speedup"],
            faster_rounds=side["faster_rounds"],
            rounds=side["rounds"],
            note="int8 simulated in float" if finished and finished.get("runtimes") else None,
        ),
        *finish_timings(finished),
    ]
    if not applied.changed:  # the same model timed twice: any difference is noise
        timings = [{**t, "verdict": "unchanged", "note": "no layer changed"} for t in timings]
    verdict = make_verdict(
        size_before=saved_before,
        size_after=saved_after,
        size_what="compact file" if compact else None,
        acc_before=acc0,
        acc_after=acc1,
        timings=timings,
    )
    table = "\n".join(
        [
            report_table(
                acc0,
                acc1,
                prof0,
                prof1,
                side,
                ("saved, compact (MB)" if compact else "saved (MB)", saved_before, saved_after),
            ),
            *finish_rows(finished),
            "(latency and peak memory: the model before and after, measured side by side in "
            "alternating rounds; ~: the memory readings overlap, no measured change)",
            verdict["text"],
        ]
    )
    result: dict[str, Any] = {
        "method": method,
        "config": applied.config,
        "dataset": name,
        "source": str(in_path),
        "device": str(device),
        "profile_batch": profile_batch,
        "transform_seconds": transform_s,
        "accuracy": {"before": acc0, "after_transform": acc_mid, "after_finetune": acc1},
        "before": prof0.to_dict(),
        "after": prof1.to_dict(),
        "latency_side_by_side": side,
        "verdict": verdict,
        "saved_bytes": {"before": saved_before, "after": saved_after},
        "accuracy_guard": _guard(acc0, acc1, max_drop),
        "layers": applied.report,
        "finish": finished,
        "finetune": None if finetune is None else finetune.to_dict(),
        "seed": seed,
        "batch_size": batch_size,
        "history": history,
        "distill": None if history is None or distill is None else distill.to_dict(),
        "bn_recalibration": None if recal is None else recal.result,
    }
    model_dir = None
    guard = result["accuracy_guard"]
    refused = guard is not None and not guard["passed"]
    if refused:
        logger.warning(
            "accuracy guard: %.2f points lost > max_drop %.2f; the model is not written",
            guard["drop_points"], guard["max_drop_points"],
        )  # fmt: skip
    if out_dir is not None and is_main_process():
        out = Path(out_dir)
        earlier, landed = run_files(out), model_identity(out)
        try:
            if not refused:
                model_dir = save_model(
                    model,
                    out / MODEL_SUBDIR,
                    input_shape=shape,  # type: ignore[arg-type]
                    mean=card.mean,
                    std=card.std,
                    class_names=card.class_names,
                    metrics={"test_accuracy": acc1, "test_accuracy_before": acc0},
                    extra={
                        "dataset": card.extra.get("dataset"),
                        "compressed_from": str(in_path),
                        "method": method,
                        "seed": seed,
                        "batch_size": batch_size,
                        "finetune": None if finetune is None else finetune.to_dict(),
                        "source": card.extra,  # how the model compressed here was made
                    },
                )
            if model_dir is not None and applied.artifacts is not None:
                result["artifacts"] = applied.artifacts(model, out)
            # A refused run never replaces the reports of a model an earlier run wrote there.
            stem = "report.refused" if refused and (out / MODEL_SUBDIR).exists() else "report"
            _land_finetune_files(out, ".refused" if stem == "report.refused" else "")
            report_path = out / f"{stem}.json"
            atomic_write_json(report_path, result)  # with the guard's verdict if refused
            atomic_write_text(out / f"{stem}.txt", applied.table + "\n\n" + table + "\n")
        except BaseException:  # a save interrupted after its swap included:
            if model_identity(out) != landed:  # the replaced run's files describe another model
                remove_stale_outputs(earlier)
            raise
    else:
        report_path = None
    return CompressResult(
        model=model, report=result, table=table, model_dir=model_dir, report_path=report_path
    )
