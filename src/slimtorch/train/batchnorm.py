"""Batch-norm statistics re-estimated for the final weights.

A batch norm's running mean and variance are an exponential average (momentum 0.1) over the
last few dozen training steps, taken while the weights were still moving. After a long run whose
learning rate decays to zero the weights barely move at the end and the average is right; after
a short fine-tune of a freshly compressed model (a gradual pruning schedule that removes the last
weights in the final steps, a factorised or channel-pruned layer) the statistics describe weights
that no longer exist, and the model in eval mode can fall to chance while it is accurate in
train mode. Re-estimating the statistics with a plain average over training batches, the weights
fixed, gives the population statistics of the final model (the "adaptive batch normalization" of
Li et al. 2020, "EagleEye: Fast Sub-net Evaluation for Efficient Neural Network Pruning",
arXiv:2007.02491, used there to judge pruned sub-networks before fine-tuning).

:func:`recalibrate_batchnorm_` does it on its own; :class:`BatchNormRecalibration` does it at the
end of a :class:`~slimtorch.train.Trainer` run, after the last epoch's training steps and before
its evaluation and checkpoint. Under DDP each rank averages its own shard and the ranks then
average their statistics, so every replica holds the same buffers.

Example:
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    >>> batches = [(torch.randn(16, 4) * 3 + 1, torch.zeros(16)) for _ in range(4)]
    >>> recalibrate_batchnorm_(net, batches)
    {'layers': 1, 'batches': 4, 'samples': 64}
    >>> int(net[1].num_batches_tracked), net[1].momentum, net.training
    (4, 0.1, True)
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from slimtorch.core.errors import ONE_VALUE_ERROR
from slimtorch.core.surgery import kept_modes
from slimtorch.train.callbacks import Callback
from slimtorch.train.distributed import all_reduce_sum, get_world_size
from slimtorch.train.loader import split_batch

if TYPE_CHECKING:
    from slimtorch.train.trainer import Trainer

logger = logging.getLogger(__name__)


def _tracked_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


def _stats(m: nn.modules.batchnorm._BatchNorm) -> list[torch.Tensor]:
    bufs = [m.running_mean, m.running_var, m.num_batches_tracked]
    return [b for b in bufs if b is not None]


@torch.no_grad()
def recalibrate_batchnorm_(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
) -> dict[str, int]:
    """Replace every batch norm's running statistics by their plain average over ``batches``.

    The model runs in train mode without gradients; nothing but the batch norms' running mean,
    running variance and batch count changes (pruning masks, quantizer steps and weights are
    left alone). The model's train/eval mode and each layer's momentum are restored. A batch
    norm in eval mode while the model is in train mode counts as frozen (QAT's
    ``freeze_bn_epoch``) and keeps its statistics.

    Args:
        model: The model, changed in place.
        batches: Training batches: tensors or ``(inputs, targets)`` pairs (targets unused).
        max_batches: Use at most this many batches (None: all).
        device: Move inputs there first (None: as they come).

    Returns:
        ``{"layers": ..., "batches": ..., "samples": ...}``; zeros when the model has no batch
        norm that tracks running statistics (then no batch is run).

    Raises:
        ValueError: ``max_batches`` is not a positive int, or ``batches`` yielded none.
    """
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ValueError(f"max_batches must be an int >= 1 or None, got {max_batches!r}")
    norms = _tracked_norms(model)
    # in eval mode while the model trains: frozen (QAT's freeze_bn_epoch), left as they are
    frozen = [m for m in norms if model.training and not m.training]
    norms = [m for m in norms if m not in frozen]
    if not norms:
        return {"layers": 0, "batches": 0, "samples": 0}
    # copies to put back if the loop fails; the buffers themselves are reset in place, so
    # anything holding them (a compiled graph, a DDP wrapper) keeps seeing the same tensors
    saved = [(m, m.momentum, [b.clone() for b in _stats(m)]) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches that follow
    n_batches = samples = 0
    try:
        with kept_modes(model, training=True):  # each module given back its own mode
            for m in frozen:
                m.eval()
            for batch in batches:
                if max_batches is not None and n_batches >= max_batches:
                    break
                inputs = batch if isinstance(batch, torch.Tensor) else split_batch(batch)[0]
                if device is not None:
                    inputs = inputs.to(device, non_blocking=True)
                model(inputs)
                n_batches += 1
                samples += int(inputs.shape[0])
        if n_batches == 0:
            raise ValueError("batches yielded no batch; pass training batches")
    except BaseException:
        for m, momentum, old in saved:
            m.momentum = momentum
            for buf, value in zip(_stats(m), old, strict=True):
                buf.copy_(value)
        raise
    for m, momentum, _ in saved:
        m.momentum = momentum
    world = get_world_size()
    if world > 1:  # equal shards: the mean of the ranks' averages is the average over all
        for m in norms:
            for buf in _stats(m)[:2]:  # mean and variance
                buf.copy_(all_reduce_sum(buf.float()).div_(world).to(buf.dtype))
        count = torch.tensor([float(samples)], device=_stats(norms[0])[0].device)
        samples = int(all_reduce_sum(count).item())  # over every rank's shard
    return {"layers": len(norms), "batches": n_batches, "samples": samples}


@torch.no_grad()
def check_trains_on_one_sample(model: nn.Module, example: torch.Tensor) -> None:
    """Raise before any work when a batch of one sample cannot train ``model``.

    A batch norm in train mode needs more than one value per channel; a model whose maps reach
    1x1 (vgg11-bn at 28x28) fails on the first step of a batch-1 run, after whatever ran before
    it (a compress run's transform). One training-mode forward of one sample on a copy finds
    that out first; the model itself is not touched.

    Args:
        model: The model to fine-tune.
        example: Inputs of the model (the first sample is used).

    Raises:
        ValueError: A batch norm sees one value per channel, naming it.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
        >>> check_trains_on_one_sample(net, torch.randn(1, 1, 3, 3))
        Traceback (most recent call last):
        ...
        ValueError: batches of one sample cannot train this model: the batch norm 1 sees one ...
    """
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return
    probe = copy.deepcopy(model).train()
    seen: list[tuple[str, str]] = []  # (batch norm, its input's map) where one value arrived

    def hook(name: str) -> Any:
        def pre(mod: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and x.dim() >= 2 and x[0].numel() == x.shape[1]:
                seen.append((name, "x".join(map(str, x.shape[2:])) or "one value"))

        return pre

    for name, mod in probe.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.register_forward_pre_hook(hook(name))
    try:
        probe(example[:1])
    except Exception as exc:  # anything else is met, and reported, by the run itself
        if not str(exc).startswith(ONE_VALUE_ERROR) or not seen:
            return
        name, size = seen[-1]
        raise ValueError(
            f"batches of one sample cannot train this model: the batch norm {name} sees one "
            f"value per channel (its input is {size}); use a batch size of 2 or more per process"
        ) from exc


class BatchNormRecalibration(Callback):
    """Re-estimate batch-norm statistics at the end of training (see the module docstring).

    Runs in the last epoch's ``on_train_epoch_end``, so that epoch's evaluation, the checkpoint
    and the saved model all see the re-estimated statistics. A run that a callback stops after
    an evaluation (:class:`~slimtorch.train.EarlyStopping`) is recalibrated in ``on_fit_end``
    instead, and its checkpoint written again; only that epoch's logged evaluation predates
    it. ``result`` holds what :func:`recalibrate_batchnorm_` returned (None until it ran).

    Args:
        max_batches: Training batches to average over (at most one epoch's worth).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
        >>> loader = [(torch.randn(16, 4), torch.randint(0, 2, (16,))) for _ in range(3)]
        >>> recal = BatchNormRecalibration(max_batches=2)
        >>> _ = Trainer(net, TrainConfig(epochs=2, progress=False), callbacks=[recal]).fit(loader)
        >>> recal.result
        {'layers': 1, 'batches': 2, 'samples': 32}
    """

    def __init__(self, max_batches: int = 100) -> None:
        if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1:
            raise ValueError(f"max_batches must be an int >= 1, got {max_batches!r}")
        self.max_batches = max_batches
        self.result: dict[str, int] | None = None

    def run_info(self) -> dict[str, Any]:
        return {"max_batches": self.max_batches}  # it shapes the final model

    def on_fit_start(self, trainer: Trainer) -> None:
        self.result = None

    def on_train_epoch_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if trainer.epoch + 1 >= trainer.config.epochs or trainer.should_stop:
            self._recalibrate(trainer, trainer.epoch)

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.result is None and trainer.should_stop and trainer.epoch > 0:
            self._recalibrate(trainer, trainer.epoch - 1)  # stopped after its evaluation
            if self.result is not None:
                from slimtorch.train.trainer_state import save_trainer_state

                save_trainer_state(trainer)

    def _recalibrate(self, trainer: Trainer, epoch: int) -> None:
        loader = trainer.train_loader
        if not _tracked_norms(trainer.model):
            # info, not a warning: compress recalibrates by default, whatever the model
            logger.info("batch-norm recalibration: the model has no batch norm that tracks "
                        "running statistics; nothing re-estimated")  # fmt: skip
            return
        if loader is None:
            return
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)  # the epoch's own order: deterministic on resume
        self.result = recalibrate_batchnorm_(
            trainer.model, loader, max_batches=self.max_batches, device=trainer.device
        )
        logger.info(
            "batch-norm statistics re-estimated over %d batches (%d layers)",
            self.result["batches"],
            self.result["layers"],
        )
