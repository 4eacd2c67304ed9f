"""The Trainer's checkpoint: everything a run needs to resume exactly where it stopped.

The model, optimiser, scheduler and gradient-scaler states, every callback's state, the epoch,
the step within it, the RNG states, the history and the running epoch metrics go into one
weights-only-loadable file (:mod:`slimtorch.train.checkpoint`), written atomically by rank 0.
Resuming checks that the loader has the same number of steps per epoch, that the run is the
same one (``Trainer.run_info``: data, batch size, augmentation ...; each callback's
``run_info``: sparse training, distillation with its teacher ...) and that the states fit the
model and optimiser, and names what does not. The checkpoint also keeps the torch version
that wrote it: a resume under another major.minor version warns (its kernels may differ).

Example:
    >>> import tempfile, pathlib; d = pathlib.Path(tempfile.mkdtemp())
    >>> loader = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(2)]
    >>> first = Trainer(nn.Linear(4, 2), TrainConfig(epochs=1, progress=False), out_dir=d)
    >>> _ = first.fit(loader)
    >>> again = Trainer(nn.Linear(4, 2), TrainConfig(epochs=1, progress=False), out_dir=d)
    >>> again.fit(loader, resume=True).epoch, again.global_step  # nothing left to train
    ([1], 2)
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import TYPE_CHECKING, Any

import torch

from slimtorch.core.errors import CheckpointError
from slimtorch.train.checkpoint import load_checkpoint, save_checkpoint
from slimtorch.train.distributed import barrier, is_main_process
from slimtorch.train.history import History
from slimtorch.train.meter import Meter
from slimtorch.train.seeding import get_rng_state

if TYPE_CHECKING:
    from slimtorch.train.trainer import Trainer

logger = logging.getLogger(__name__)

_REQUIRED = ("model", "optimizer", "scheduler", "epoch", "step_in_epoch", "global_step", "rng")
# settings the saved optimiser state carries in its param groups: a resume cannot change them
_OPTIMIZER_FIELDS = (
    "optimizer",
    "lr",
    "momentum",
    "nesterov",
    "weight_decay",
    "decay_norm_and_bias",
)
_ADAMW_FIELDS = ("optimizer", "lr", "weight_decay", "decay_norm_and_bias")  # no momentum


def check_not_diverged(trainer: Trainer, loss: float) -> None:
    """Raise before a checkpoint would store a diverged run (parameters NaN/inf).

    A non-finite mean loss with finite parameters only warns: with the fp16 gradient scaler an
    overflowing step is skipped, so the weights are still good. Unless the scaler's scale has
    fallen below 1: it halves at each skipped step from 65536, so by then step after step has
    overflowed even unscaled, and the run makes no progress (the weights have grown too large
    for fp16; a healthy run keeps its scale far above 1).
    """
    model = trainer.model
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    where = f"epoch {trainer.epoch + 1}, step {trainer.global_step}"
    first = trainer._meter.first_nonfinite_batch() if trainer._meter is not None else None
    if first is not None and first + 1 < trainer.step_in_epoch:  # not the batch just run
        where += f" (its loss was first non-finite at batch {first} of the epoch)"
    scale = trainer.scaler.get_scale() if trainer.scaler is not None else None
    if not bad and not math.isfinite(loss) and scale is not None and scale < 1.0:
        raise FloatingPointError(
            f"training diverged at {where}: the training loss is {loss} and the fp16 gradient "
            f"scaler skipped step after step (its scale fell to {scale:.3g}); no checkpoint was "
            "written for it. Lower lr, set grad_clip_norm, or train in bf16 or fp32"
        )
    if not bad:
        if not math.isfinite(loss):
            logger.warning("%s: the mean training loss is %s (parameters are finite)", where, loss)
        return
    names = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
    raise FloatingPointError(
        f"training diverged at {where}: the training loss is {loss} and parameters {names} "
        "are not finite; no checkpoint was written for it (the previous one, if any, is "
        "intact). Lower lr, set grad_clip_norm, or check the inputs for NaN/inf"
    )


RECORD_VERSION = 3
"""Version of :func:`run_record`'s contents. A record of an older version (none: 1) lacks
fields that later versions added, so only the fields both records hold are compared
(3 added the classifier's ``model_kwargs``)."""


def run_record(trainer: Trainer) -> dict[str, Any]:
    """The trainer's ``run_info`` and its callbacks' (by checkpoint key), as JSON values."""
    callbacks = {
        key: info
        for key, cb in zip(trainer._callback_keys(), trainer.callbacks, strict=True)
        if (info := cb.run_info()) is not None
    }
    record = {**trainer.run_info, "callbacks": callbacks, "record_version": RECORD_VERSION}
    return dict(json.loads(json.dumps(record, default=str)))


def _run_diffs(then: Any, now: Any, path: str, out: list[str], older: bool = False) -> None:
    """Append ``path: <then> then, <now> now`` for every value that differs, dicts walked.
    ``older``: ``then`` is an older record, so a key only ``now`` holds is not compared."""

    def brief(value: Any, present: bool) -> str:
        if not present:
            return "not set"
        text = json.dumps(value, sort_keys=True)
        if len(text) <= 80:
            return text
        return "set" if isinstance(value, dict) else text[:77] + "..."

    if isinstance(then, dict) and isinstance(now, dict):
        for key in sorted(then.keys() | now.keys()):
            sub = f"{path}.{key}" if path else str(key)
            if key in then and key in now:
                _run_diffs(then[key], now[key], sub, out, older)
            elif key in then or not older:
                out.append(f"{sub}: {brief(then.get(key), key in then)} then, "
                           f"{brief(now.get(key), key in now)} now")  # fmt: skip
    elif then != now:
        out.append(f"{path}: {brief(then, True)} then, {brief(now, True)} now")


def _check_same_run(trainer: Trainer, saved: Any, path: Any) -> None:
    """Refuse a resume whose run differs from the checkpoint's in a key both record."""
    if not isinstance(saved, dict):
        return  # written before runs were recorded
    now = run_record(trainer)
    version = saved.get("record_version", 1)
    older = not isinstance(version, int) or version < RECORD_VERSION
    diffs: list[str] = []
    for key in sorted(saved.keys() & now.keys() - {"record_version"}):
        _run_diffs(saved[key], now[key], key, diffs, older)
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was written by another run ({'; '.join(diffs)}); resume with "
            "the same options, or use a new out_dir (--out)"
        )


def save_trainer_state(trainer: Trainer) -> None:
    """Write the trainer's full state to its checkpoint (rank 0), then wait for every rank."""
    path = trainer.checkpoint_path
    if path is None or trainer.optimizer is None or trainer.scheduler is None:
        return
    meter = trainer._meter.state_dict(reduce=True) if trainer._meter is not None else {}
    if is_main_process():
        keys = trainer._callback_keys()
        state = {
            "model": trainer.model.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(),
            "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else {},
            "callbacks": {
                k: cb.state_dict() for k, cb in zip(keys, trainer.callbacks, strict=True)
            },
            "epoch": trainer.epoch,
            "step_in_epoch": trainer.step_in_epoch,
            "global_step": trainer.global_step,
            "steps_per_epoch": trainer.steps_per_epoch,
            "rng": get_rng_state(),
            "epoch_rng": trainer.epoch_rng,
            "should_stop": trainer.should_stop,
            "history": trainer.history.to_dict(),
            "meter": meter,
            "config": trainer.config.to_dict(),
            "train_seconds": trainer.train_seconds,
            "run": run_record(trainer),
            "torch_version": str(torch.__version__),
        }
        save_checkpoint(path, state)
        logger.debug("checkpoint written to %s at step %d", path, trainer.global_step)
    barrier()


def resume_trainer_state(trainer: Trainer) -> dict[str, Any] | None:
    """Load the trainer's checkpoint into it; the saved RNG state (None: no checkpoint yet).

    Raises:
        ValueError: The trainer has no ``out_dir``.
        CheckpointError: The checkpoint is corrupt or does not match the model, optimiser or
            loader.
    """
    path = trainer.checkpoint_path
    if path is None:
        raise ValueError("fit(resume=True) needs out_dir on the Trainer; pass out_dir=...")
    if not path.exists():
        logger.warning("resume=True but %s does not exist; starting from scratch", path)
        return None
    state = load_checkpoint(path, required=_REQUIRED)
    _warn_torch_version(state.get("torch_version"), path)
    _check_same_run(trainer, state.get("run"), path)
    if state.get("steps_per_epoch") != trainer.steps_per_epoch:
        raise CheckpointError(
            f"checkpoint {path} was written with {state.get('steps_per_epoch')} steps per "
            f"epoch but the training loader has {trainer.steps_per_epoch}; resume with the same "
            "data, batch size and world size, or use a new out_dir (--out)"
        )
    saved_config = state.get("config")
    saved_config = saved_config if isinstance(saved_config, dict) else {}
    saved_epochs = saved_config.get("epochs")
    if trainer.config.schedule == "onecycle" and saved_epochs not in (None, trainer.config.epochs):
        raise CheckpointError(
            f"checkpoint {path} was written for {saved_epochs} epochs of a one-cycle schedule, "
            f"whose learning rate is fixed by that length; resume with epochs={saved_epochs} "
            f"(--epochs {saved_epochs}), or start a new run (a cosine or constant schedule can "
            "be extended)"
        )
    seed = saved_config.get("seed", trainer.config.seed)
    if seed != trainer.config.seed:
        raise CheckpointError(
            f"checkpoint {path} was written with seed={seed!r} (now {trainer.config.seed!r}); "
            "a resumed run continues its saved random streams, so its seed cannot change: "
            f"resume with seed={seed!r} (--seed {seed}), or start a new run"
        )
    used = _OPTIMIZER_FIELDS if trainer.config.optimizer == "sgd" else _ADAMW_FIELDS
    fixed = [
        f"{k}={saved_config[k]!r} (now {v!r})"
        for k, v in trainer.config.to_dict().items()
        if k in used and k in saved_config and saved_config[k] != v
    ]
    if fixed:
        raise CheckpointError(
            f"checkpoint {path} was written with {', '.join(fixed)}; its optimiser state keeps "
            "those settings, so a resume would silently train with the old ones: resume with "
            "the same values, or start a new run from the saved model"
        )
    assert trainer.optimizer is not None and trainer.scheduler is not None
    try:
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        _check_optimizer_state(trainer.optimizer)
        trainer.scheduler.load_state_dict(state["scheduler"])
        _lr_from_schedule(trainer.scheduler)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"checkpoint {path} does not match this model/optimiser ({exc}); resume with "
            "the same model and TrainConfig, or use a new out_dir (--out)"
        ) from exc
    try:
        if trainer.scaler is not None and state.get("scaler"):
            trainer.scaler.load_state_dict(state["scaler"])
        dropped = trainer.scaler is None and bool(state.get("scaler"))  # e.g. fp16 -> auto on CPU
        saved = state.get("callbacks", {})
        for key, cb in zip(trainer._callback_keys(), trainer.callbacks, strict=True):
            if key in saved:
                cb.load_state_dict(saved[key])
            else:
                logger.warning("checkpoint has no state for callback %s", key)
        epoch = int(state["epoch"])
        step_in_epoch = int(state["step_in_epoch"])
        global_step = int(state["global_step"])
        if not (0 <= epoch and 0 <= step_in_epoch < max(trainer.steps_per_epoch, 1)):
            raise ValueError(f"epoch {epoch}, step_in_epoch {step_in_epoch} out of range")
        seconds_before = float(state.get("train_seconds", 0.0))  # absent before it was saved
        history = History.from_dict(state.get("history", {}))
        meter = Meter(trainer.device)
        if step_in_epoch > 0 and state.get("meter"):
            # the saved sums are already summed over ranks: give them to rank 0 only
            meter.load_state_dict(state["meter"], counts=is_main_process())
        rng: dict[str, Any] = state["rng"]
        for saved_rng in (rng, state.get("epoch_rng") or rng):
            if not isinstance(saved_rng, dict) or "torch" not in saved_rng:
                raise ValueError(f"RNG state {type(saved_rng).__name__} lacks 'torch'")
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(
            f"checkpoint {path} holds a malformed field ({type(exc).__name__}: {exc}); resume "
            "with the same callbacks and TrainConfig, or use a new out_dir (--out)"
        ) from exc
    changed = sorted(k for k, v in trainer.config.to_dict().items() if saved_config.get(k) != v)
    note = "the checkpoint's fp16 gradient-scaler state is dropped: this run scales no losses"
    if changed:
        extra = f"; {note}" if dropped else ""
        logger.warning("resuming with changed config fields: %s%s", ", ".join(changed), extra)
    elif dropped:
        logger.warning("resuming %s: %s", path, note)
    trainer.epoch, trainer.step_in_epoch, trainer.global_step = epoch, step_in_epoch, global_step
    trainer.seconds_before, trainer.history, trainer._meter = seconds_before, history, meter
    trainer.epoch_rng = state.get("epoch_rng")  # absent before it was saved: as before
    trainer.should_stop = bool(state.get("should_stop", False))
    logger.info("resumed from %s: epoch %d, step %d", path, trainer.epoch, trainer.step_in_epoch)
    if trainer.should_stop:
        logger.info(
            "the run in %s was stopped early by a callback at epoch %d: nothing is left to "
            "train (start a new run from its model to train on)",
            path,
            trainer.epoch,
        )
    return rng


def _major_minor(version: Any) -> str | None:
    """``"2.11"`` of ``"2.11.0+cu128"`` (None: no version, as in older checkpoints)."""
    match = re.match(r"(\d+)\.(\d+)", version) if isinstance(version, str) else None
    return f"{match[1]}.{match[2]}" if match else None


def _warn_torch_version(saved: Any, path: Any) -> None:
    """Warn when the checkpoint was written under another torch major.minor version."""
    then, now = _major_minor(saved), _major_minor(str(torch.__version__))
    if then is not None and now is not None and then != now:
        logger.warning(
            "checkpoint %s was written by torch %s, resuming under %s: results may differ slightly",
            path,
            then,
            now,
        )


def _check_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Raise ``ValueError`` if a loaded per-parameter state (momentum, Adam moments) does not
    have its parameter's shape: torch's ``load_state_dict`` takes it, and the first step then
    fails inside the optimiser without naming the checkpoint."""
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() and value.shape != p.shape:
                    raise ValueError(
                        f"optimiser state {key!r} of parameter {i} in group {g} has shape "
                        f"{tuple(value.shape)}, the parameter {tuple(p.shape)}"
                    )


def _lr_from_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """Set each group's learning rate from the schedule rebuilt for this run's config: the
    loaded optimiser state holds the rate of the saved run's schedule (with ``epochs``
    extended, the old schedule's final rate) until the next ``scheduler.step()``."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        return  # OneCycleLR: its length cannot change on resume (refused above)
    groups = scheduler.optimizer.param_groups
    for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]  # what get_last_lr() reports
