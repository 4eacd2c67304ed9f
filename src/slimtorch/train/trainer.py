"""The one training loop of slimtorch.

Every training-time method is a :class:`~slimtorch.train.Callback` or a loss of this
:class:`Trainer`. A loader is any iterable of ``(inputs, targets)`` batches with ``__len__``; if it
has ``set_epoch(e)`` it is called at the start of every epoch, and when resuming mid-epoch
``set_start_batch(k)`` is used if present (otherwise ``k`` batches are drawn and dropped).

Example:
    >>> import tempfile, pathlib; d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(320, 8)
    >>> y = x[:, :4].argmax(dim=1)  # a learnable 4-class task
    >>> train_loader = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 256, 32)]
    >>> val_loader, test_loader = [(x[256:288], y[256:288])], [(x[288:], y[288:])]
    >>> model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> trainer = Trainer(model, TrainConfig(epochs=3, lr=0.05, progress=False), out_dir=d / "mlp")
    >>> history = trainer.fit(train_loader, val_loader)
    >>> sorted(p.name for p in (d / "mlp").iterdir())
    ['checkpoint.pt', 'history.json', 'train_config.json']
    >>> trainer.evaluate(test_loader)["accuracy"] > 0.7
    True
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtorch.core.devices import resolve_device
from slimtorch.core.io import atomic_write_json
from slimtorch.core.surgery import eval_held, kept_modes, train_keeping
from slimtorch.train.amp import AmpPlan, resolve_amp
from slimtorch.train.callbacks import Callback
from slimtorch.train.config import TrainConfig
from slimtorch.train.distributed import (
    all_reduce_sum,
    broadcast_buffers_,
    check_replicas,
    data_parallel,
    get_device_index,
    get_world_size,
    is_main_process,
    wrap_ddp,
)
from slimtorch.train.history import History, format_row
from slimtorch.train.interrupt import StopRequest, interrupted, stop_requests
from slimtorch.train.loader import (
    batch_note,
    check_labels,
    check_loader,
    iter_from,
    label_range,
    split_batch,
    to_device,
)
from slimtorch.train.meter import Meter, batch_size_of
from slimtorch.train.optim import build_optimizer, build_scheduler
from slimtorch.train.progress import ProgressBar
from slimtorch.train.seeding import get_rng_state, seed_everything, set_rng_state
from slimtorch.train.trainer_state import (
    check_not_diverged,
    resume_trainer_state,
    save_trainer_state,
)

logger = logging.getLogger(__name__)

LossFn = Callable[[Any, Any], torch.Tensor]


class Trainer:
    """Train and evaluate a model.

    Args:
        model: The model; :attr:`model` may be replaced by a converted copy (SyncBatchNorm).
        config: The training config.
        device: The device to train on; under multi-GPU DDP, ``cuda:LOCAL_RANK`` is used.
        callbacks: Callbacks, run in this order.
        out_dir: Folder for ``checkpoint.pt``, ``train_config.json`` and ``history.json``;
            ``None`` writes nothing (and cannot resume).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``; default cross-entropy with the
            config's label smoothing.

    Attributes available to callbacks: ``model``, ``config``, ``device``, ``optimizer``,
    ``scheduler``, ``scaler``, ``amp``, ``epoch`` (0-based), ``step_in_epoch`` (batches done
    in this epoch), ``global_step`` (optimiser steps done), ``steps_per_epoch``,
    ``should_stop``, ``history``, ``last_grad_norm`` (pre-clip norm, when clipping).

    Example:
        >>> import tempfile, pathlib; d = pathlib.Path(tempfile.mkdtemp())
        >>> loader = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(2)]
        >>> cfg = TrainConfig(epochs=2, progress=False)
        >>> trainer = Trainer(nn.Linear(4, 2), cfg, device="cpu", out_dir=d / "a")  # or "cuda"
        >>> len(trainer.fit(loader, loader).to_dict()["val_accuracy"])
        2
        >>> again = Trainer(nn.Linear(4, 2), cfg, out_dir=d / "a")  # e.g. after a crash
        >>> again.fit(loader, loader, resume=True).epoch  # nothing left to train
        [1, 2]
        >>> torch.equal(again.model.weight, trainer.model.weight), again.global_step
        (True, 4)
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        *,
        device: str | torch.device = "cpu",
        callbacks: Sequence[Callback] = (),
        out_dir: str | os.PathLike[str] | None = None,
        loss_fn: LossFn | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(
                    f"callbacks must subclass slimtorch.train.Callback, got {type(cb).__name__}"
                )
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.model = model
        self.config = config
        self.device = resolve_device(device, any_index=data_parallel())  # DDP maps it
        self.callbacks: list[Callback] = list(callbacks)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.loss_fn = loss_fn
        self._default_loss: LossFn | None = None  # the cross-entropy made when none was given
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self.amp: AmpPlan | None = None
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.steps_per_epoch = 0
        self.train_loader: Any = None
        """The loader :meth:`fit` trains on (for callbacks that read training batches)."""
        self.eval_name = "val"
        """What the per-epoch evaluation is called in logs and the progress bar (``"test"``
        when the caller evaluates on the test split); the history keys stay ``val_*`` and its
        ``eval_split`` says which."""
        self.should_stop = False
        self.epoch_rng: dict[str, Any] | None = None  # the RNG state the epoch's loader began at
        self.history = History()
        self.last_grad_norm: torch.Tensor | None = None
        self.replica_mismatches: list[str] | None = None
        """After a data-parallel :meth:`fit`: the parameters and buffers that differ between
        ranks (``[]``: all identical); None when the run was not data-parallel."""
        self.run_info: dict[str, Any] = {}
        """What defines the run besides ``config`` (data, batch size ...; JSON values), saved
        in the checkpoint with the callbacks' ``run_info``: a resume that differs is refused."""
        self.seconds_before = 0.0
        """Seconds the run had trained before this :meth:`fit` (from the checkpoint it resumed;
        the time since the last checkpoint of an interrupted run is not counted)."""
        self._fit_start: float | None = None
        self._fit_seconds = 0.0
        self._meter: Meter | None = None
        self._prepared = False
        self._held: dict[str, nn.Module] = {}  # eval-mode modules kept so in training
        self._stop = StopRequest()  # SIGINT/SIGTERM during fit

    # ------------------------------------------------------------------ set-up

    @property
    def checkpoint_path(self) -> Path | None:
        """``out_dir / "checkpoint.pt"`` (``None`` without ``out_dir``)."""
        return None if self.out_dir is None else self.out_dir / "checkpoint.pt"

    @property
    def unwrapped_model(self) -> nn.Module:
        """The trained model without any DDP wrapper (the same object as :attr:`model`)."""
        return self.model

    @property
    def is_distributed(self) -> bool:
        """Whether training is data-parallel (see ``distributed.data_parallel``)."""
        return data_parallel()

    def _prepare(self) -> None:
        if self._prepared:
            return
        if self.is_distributed and self.device.type == "cuda":
            self.device = torch.device("cuda", get_device_index())
            torch.cuda.set_device(self.device)
        if self.config.sync_batchnorm and self.is_distributed:
            if self.device.type == "cuda":
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            else:
                logger.info("sync_batchnorm is ignored on %s (needs CUDA)", self.device)
        self.model.to(self.device)
        if self.config.channels_last:
            self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.amp = resolve_amp(self.config.amp, self.device)
        if is_main_process():
            logger.debug("running on %s, precision %s", self.device, self.amp.name)
        self._prepared = True

    def _criterion(self) -> LossFn:
        if self.loss_fn is None:
            self.loss_fn = nn.CrossEntropyLoss(label_smoothing=self.config.label_smoothing)
            self._default_loss = self.loss_fn
        return self.loss_fn

    def _to_device(self, obj: Any) -> Any:
        return to_device(obj, self.device, self.config.channels_last)

    def _callback_keys(self) -> list[str]:
        keys: list[str] = []
        for cb in self.callbacks:
            key, i = cb.state_key, 1
            while key in keys:
                key, i = f"{cb.state_key}#{i}", i + 1
            keys.append(key)
        return keys

    def running_metrics(self) -> dict[str, Any]:
        """This rank's loss, accuracy and images/s so far in the current epoch (syncs the GPU).

        Example:
            >>> trainer = Trainer(nn.Linear(4, 2), TrainConfig(epochs=1, progress=False))
            >>> trainer.running_metrics()  # before fit
            {'loss': nan, 'accuracy': None, 'images_per_s': 0.0, 'n': 0}
            >>> loader = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(2)]
            >>> _ = trainer.fit(loader)
            >>> sorted(trainer.running_metrics()), trainer.running_metrics()["n"]
            (['accuracy', 'images_per_s', 'loss', 'n'], 16)
        """
        if self._meter is None:
            return {"loss": float("nan"), "accuracy": None, "images_per_s": 0.0, "n": 0}
        res = self._meter.result(reduce=False)
        res["images_per_s"] = res["n"] * get_world_size() / max(self._meter.elapsed(), 1e-9)
        return res

    # ------------------------------------------------------------------ loop

    def _label_range(self, batch: Any) -> tuple[int, int] | None:
        """:func:`label_range` of the batch with the default loss; a custom loss may use other
        targets or an ``ignore_index``, so its labels are not checked."""
        default = self.loss_fn is None or self.loss_fn is self._default_loss
        return label_range(batch) if default else None

    def _call(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def _train_step(self, model: nn.Module, batch: Any, batch_idx: int) -> None:
        assert self.optimizer is not None and self.scheduler is not None
        assert self.amp is not None and self._meter is not None
        labels = self._label_range(batch)
        inputs, targets = split_batch(self._to_device(batch), f"train_loader batch {batch_idx}")
        if batch_size_of(targets) == 0:
            raise ValueError(
                f"train_loader batch {batch_idx} is empty; yield only non-empty batches "
                "(drop_last=True drops a short last one)"
            )
        self._call("on_train_batch_start", (inputs, targets), batch_idx)
        self.optimizer.zero_grad(set_to_none=True)
        with batch_note("train_loader", batch_idx, inputs, targets), self.amp.autocast(self.device):
            outputs = model(inputs)
            check_labels(labels, outputs, "train_loader", batch_idx)
            loss = self._criterion()(outputs, targets)
            for cb in self.callbacks:
                loss = cb.compute_loss(self, inputs, outputs, targets, loss)
        self._call("on_before_backward", loss)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        self._call("on_after_backward")
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        self._call("on_before_optimizer_step", self.optimizer)
        if self.config.grad_clip_norm is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            self.last_grad_norm = nn.utils.clip_grad_norm_(params, self.config.grad_clip_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self._call("on_after_optimizer_step")
        self.scheduler.step()
        self.global_step += 1
        self.step_in_epoch = batch_idx + 1
        loss = loss.detach()
        self._meter.update(outputs, loss, targets, batch_idx)
        self._call("on_train_batch_end", outputs.detach(), loss, batch_idx)

    def _train_epoch(
        self, model: nn.Module, loader: Any, val_loader: Any, rng: dict[str, Any] | None
    ) -> None:
        assert self.optimizer is not None and self._meter is not None
        start = self.step_in_epoch
        if rng is not None and start == 0:
            set_rng_state(rng)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(self.epoch)
        if start == 0:
            self._meter.reset()
        train_keeping(self.model, self._held)  # modules the user froze stay frozen
        self._call("on_train_epoch_start")
        if start == 0:
            self.epoch_rng = get_rng_state()  # what a shuffling loader's iter() draws from
        elif self.epoch_rng is not None:  # resumed mid-epoch: draw the epoch's order again
            set_rng_state(self.epoch_rng)
        batches = iter_from(loader, start)
        if rng is not None and start > 0:
            set_rng_state(rng)  # after the skipped batches: the step-j stream continues exactly
        every = self.config.checkpoint_every_steps
        for batch_idx, batch in enumerate(batches, start=start):
            self._train_step(model, batch, batch_idx)
            mid_epoch = self.step_in_epoch < self.steps_per_epoch
            if every and self.global_step % every == 0 and mid_epoch:
                check_not_diverged(self, self._meter.result(reduce=True)["loss"])
                save_trainer_state(self)
            if mid_epoch and self._stop.signum is not None:  # SIGINT/SIGTERM: resumable
                save_trainer_state(self)
                raise interrupted(self._stop, self.checkpoint_path, self.global_step)
            if self.should_stop and not self.is_distributed:
                break
        if self.step_in_epoch < self.steps_per_epoch and not self.should_stop:
            raise ValueError(
                f"train_loader yielded {self.step_in_epoch} batches in epoch {self.epoch + 1} "
                f"but len(train_loader) is {self.steps_per_epoch}; make its __iter__ yield "
                "every batch its __len__ counts"
            )
        if self.is_distributed:
            broadcast_buffers_(self.model)  # rank 0's statistics for evaluation and checkpoint
        res = self._meter.result(reduce=True)
        check_not_diverged(self, res["loss"])
        elapsed = self._meter.elapsed()
        row: dict[str, Any] = {
            "epoch": self.epoch + 1,
            "train_loss": res["loss"],
            "train_accuracy": res["accuracy"],
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "images_per_s": res["n"] / max(elapsed, 1e-9),
            "epoch_time_s": elapsed,
        }
        self._call("on_train_epoch_end", dict(row))
        every_eval = self.config.eval_every_epochs
        last = self.epoch + 1 == self.config.epochs
        if val_loader is not None and every_eval and ((self.epoch + 1) % every_eval == 0 or last):
            val = self.evaluate(val_loader)
            metrics = {"val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_n": val["n"]}
            self._call("on_validation_end", metrics)
            row.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
        self.history.eval_split = self.eval_name
        self.history.append(row)
        if is_main_process():
            shown = format_row(row, self.eval_name)  # a progress bar shows it already
            bar = any(isinstance(c, ProgressBar) for c in self.callbacks)
            level = logging.DEBUG if bar else logging.INFO
            logger.log(level, "epoch %d/%d: %s", self.epoch + 1, self.config.epochs, shown)
        if self.is_distributed:  # every rank stops if any rank asked to
            flag = torch.tensor([float(self.should_stop)], device=self.device)
            self.should_stop = bool(all_reduce_sum(flag).item() > 0)
        self.epoch += 1
        self.step_in_epoch = 0
        save_trainer_state(self)
        if self.out_dir is not None and is_main_process():
            atomic_write_json(self.out_dir / "history.json", self.history.to_dict())

    def fit(self, train_loader: Any, val_loader: Any = None, *, resume: bool = False) -> History:
        """Train for ``config.epochs`` epochs (or until a callback sets ``should_stop``).

        Seeds the process's torch, numpy and ``random`` generators with ``config.seed`` first
        (and with ``config.deterministic`` turns deterministic algorithms on for the process).
        Submodules that a model in train mode holds in eval mode (a batch norm frozen for a
        small-batch fine-tune) stay in eval mode; a model in eval mode trains whole.

        Args:
            train_loader: Training batches (see the module docstring for the protocol).
            val_loader: Validation batches, evaluated every ``eval_every_epochs`` epochs.
            resume: Continue from ``out_dir/checkpoint.pt`` when it exists.

        Returns:
            The per-epoch :class:`History` (also written to ``out_dir/history.json``).

        Raises:
            CheckpointError: ``resume=True`` and the checkpoint is corrupt or does not match.
            TrainingInterrupted: SIGINT/SIGTERM arrived; the step ended and its checkpoint was
                written (see :mod:`slimtorch.train.interrupt`).

        Example:
            >>> _ = torch.manual_seed(0)
            >>> x = torch.randn(64, 8)
            >>> y = x[:, :4].argmax(dim=1)  # a learnable 4-class task
            >>> train_loader = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
            >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
            >>> history = Trainer(model, TrainConfig(epochs=2, progress=False)).fit(train_loader)
            >>> history.train_loss[-1] < history.train_loss[0]
            True
        """
        self.steps_per_epoch = check_loader(train_loader, "train_loader")
        self.train_loader = train_loader
        if val_loader is not None:
            check_loader(val_loader, "val_loader")
        seed_everything(self.config.seed, self.config.deterministic)
        self._call("setup")
        self._prepare()
        assert self.amp is not None
        self.optimizer = build_optimizer(self.model, self.config)
        self.scheduler = build_scheduler(self.optimizer, self.config, self.steps_per_epoch)
        self.scaler = self.amp.make_scaler(self.device)
        self.epoch = self.step_in_epoch = self.global_step = 0
        self.should_stop = False
        self.history = History()
        self.seconds_before = 0.0
        self._meter = Meter(self.device)
        if self.config.progress and not any(isinstance(c, ProgressBar) for c in self.callbacks):
            self.callbacks.append(ProgressBar())
        rng = resume_trainer_state(self) if resume else None
        self._held = eval_held(self.model)
        if is_main_process():
            logger.info("training on %s, precision %s", self.device, self.amp.name)
            if self._held:
                logger.info("kept in eval mode, as set before fit: %s", ", ".join(self._held))
        model: nn.Module = self.model
        if self.is_distributed:
            model = wrap_ddp(self.model, self.device)  # buffers synced once per epoch
        if self.out_dir is not None and is_main_process():  # history: a kill may have beaten it
            self.config.save(self.out_dir / "train_config.json")
            atomic_write_json(self.out_dir / "history.json", self.history.to_dict())
        try:  # teardown runs however this ends, on_fit_start raising included
            self._call("on_fit_start")
            self._fit_start = time.perf_counter()
            with stop_requests(enabled=not self.is_distributed) as self._stop:
                while self.epoch < self.config.epochs and not self.should_stop:
                    self._train_epoch(model, train_loader, val_loader, rng)
                    rng = None
                    if self._stop.signum is not None:  # the epoch's checkpoint is written
                        raise interrupted(self._stop, self.checkpoint_path, self.global_step)
            if self.is_distributed:
                self.replica_mismatches = check_replicas(self.model)
        finally:
            self._call("teardown")  # whether the run ended or raised
            self._fit_seconds, self._fit_start = self.train_seconds - self.seconds_before, None
            if model is not self.model:
                # free the DDP reducer (it holds the process group) before the group goes away
                del model
                gc.collect()
        self._call("on_fit_end")
        return self.history

    @property
    def train_seconds(self) -> float:
        """Seconds of training behind the model: this :meth:`fit`'s, so far or in all, plus
        :attr:`seconds_before` from the run it resumed."""
        if self._fit_start is not None:
            return self.seconds_before + time.perf_counter() - self._fit_start
        return self.seconds_before + self._fit_seconds

    @torch.no_grad()
    def evaluate(self, loader: Any) -> dict[str, Any]:
        """Mean loss, top-1 accuracy (``None`` for non-classification) and sample count.

        Under DDP each rank evaluates its shard and the sums are combined over ranks.

        Example:
            >>> test_loader = [(torch.randn(10, 4), torch.randint(0, 2, (10,))) for _ in range(3)]
            >>> Trainer(nn.Linear(4, 2), TrainConfig()).evaluate(test_loader)
            {'loss': ..., 'accuracy': ..., 'n': 30}
        """
        check_loader(loader, "loader")
        self._prepare()
        assert self.amp is not None
        meter = Meter(self.device)
        with kept_modes(self.model):
            for batch_idx, batch in enumerate(loader):
                labels = self._label_range(batch)
                inputs, targets = split_batch(self._to_device(batch), f"loader batch {batch_idx}")
                with (
                    batch_note("loader", batch_idx, inputs, targets),
                    self.amp.autocast(self.device),
                ):
                    outputs = self.model(inputs)
                    check_labels(labels, outputs, "loader", batch_idx)
                    loss = self._criterion()(outputs, targets)
                meter.update(outputs, loss, targets)
        result = meter.result(reduce=True)
        if result["n"] == 0:
            raise ValueError(
                f"loader yielded no batches although len(loader) is {len(loader)}; "
                "make its __iter__ yield the (inputs, targets) batches its __len__ counts"
            )
        return result
