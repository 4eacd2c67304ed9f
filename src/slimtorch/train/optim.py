"""Optimisers and per-iteration learning-rate schedules built from a :class:`TrainConfig`.

Weight decay skips norm-layer weights and biases unless ``decay_norm_and_bias`` is set (the
usual practice since Goyal et al. 2017, arXiv:1706.02677). Schedules are stepped once per
optimiser step:

- ``cosine``: linear warm-up ``lr * (s + 1) / W`` for ``s < W``, then
  ``lr * 0.5 * (1 + cos(pi * (s - W) / (T - W)))`` (Loshchilov & Hutter 2016, arXiv:1608.03983,
  without restarts), reaching 0 after the last step ``T``;
- ``constant``: the same warm-up, then ``lr``;
- ``onecycle``: :class:`torch.optim.lr_scheduler.OneCycleLR` (Smith & Topin 2017,
  arXiv:1708.07120) peaking at ``lr`` after ``W`` steps (30 % of the run when ``W = 0``),
  momentum left at its configured value.

Here ``s`` is the 0-based step, ``T`` the total number of steps and ``W`` the warm-up steps,
``round(warmup_epochs * steps_per_epoch)``.

Example:
    >>> cfg = TrainConfig(epochs=2, lr=0.1)
    >>> opt = build_optimizer(nn.Linear(4, 2), cfg)
    >>> sched = build_scheduler(opt, cfg, steps_per_epoch=100)
    >>> for _ in range(100):  # 100 of the 200 steps: halfway down the cosine
    ...     opt.step()
    ...     sched.step()
    >>> round(opt.param_groups[0]["lr"], 6)
    0.05
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from slimtorch.core.surgery import some_of, sparse_kernel_layers
from slimtorch.train.config import TrainConfig

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)


def param_groups(
    model: nn.Module, weight_decay: float, decay_norm_and_bias: bool = False
) -> list[dict[str, object]]:
    """Split trainable parameters into a decayed group and a no-decay group.

    The no-decay group holds every parameter of a normalisation layer and every bias (any
    parameter named ``bias`` or with fewer than 2 dimensions). Empty groups are dropped.

    Args:
        model: The model.
        weight_decay: Decay of the decayed group.
        decay_norm_and_bias: Put everything in the decayed group.

    Returns:
        Param-group dicts for a torch optimiser.

    Example:
        >>> groups = param_groups(nn.Linear(4, 2), 1e-4)
        >>> [g["weight_decay"] for g in groups]
        [0.0001, 0.0]
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        is_norm = isinstance(module, _NORM_TYPES)
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            skip = is_norm or name == "bias" or p.ndim < 2
            (no_decay if skip and not decay_norm_and_bias else decay).append(p)
    groups: list[dict[str, object]] = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if not groups:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters; expected at least one "
            "parameter with requires_grad=True; unfreeze some layers before training"
        )
    return groups


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or AdamW over :func:`param_groups` of ``model``.

    Example:
        >>> opt = build_optimizer(nn.Linear(4, 2), TrainConfig(optimizer="adamw", lr=1e-3))
        >>> type(opt).__name__
        'AdamW'
    """
    found = sparse_kernel_layers(model)
    if found:  # CSR/BSR/2:4 weights hold no trainable parameter: they would be skipped silently
        raise ValueError(
            f"layer(s) {some_of(found)} run a sparse kernel from sparsify_, whose weights do not "
            "train; call slimtorch.sparse.densify_(model) first (the dense layers keep the "
            "pruned zeros, and MaskCallback keeps them zero), train, then sparsify_ again"
        )
    groups = param_groups(model, config.weight_decay, config.decay_norm_and_bias)
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov
        )
    return torch.optim.AdamW(groups, lr=config.lr)


def warmup_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    """Number of warm-up steps, ``round(warmup_epochs * steps_per_epoch)``.

    Example:
        >>> warmup_steps(TrainConfig(epochs=3, warmup_epochs=0.5), 10)
        5
    """
    return round(config.warmup_epochs * steps_per_epoch)


def lr_factor(schedule: str, step: int, total_steps: int, warmup: int) -> float:
    """Multiplier of the peak learning rate at 0-based ``step`` for ``cosine``/``constant``.

    Example:
        >>> lr_factor("cosine", 0, 10, 0)
        1.0
        >>> lr_factor("constant", 1, 10, 4)
        0.5
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(1, total_steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"schedule must be 'cosine' or 'constant' here, got {schedule!r}")


def _factor_fn(schedule: str, total: int, warmup: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        return lr_factor(schedule, step, total, warmup)

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The per-iteration schedule of ``config.schedule`` for ``epochs * steps_per_epoch`` steps.

    Example:
        >>> opt = build_optimizer(nn.Linear(4, 2), TrainConfig(lr=0.1))
        >>> sched = build_scheduler(opt, TrainConfig(epochs=2, schedule="onecycle"), 50)
        >>> type(sched).__name__, round(opt.param_groups[0]["lr"], 6)  # starts at lr / 25
        ('OneCycleLR', 0.004)
    """
    if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int):
        raise TypeError(f"steps_per_epoch must be an int, got {type(steps_per_epoch).__name__}")
    if steps_per_epoch < 1:
        raise ValueError(
            f"steps_per_epoch must be >= 1, got {steps_per_epoch}; the training loader is empty, "
            "check the dataset and the batch size"
        )
    total = config.epochs * steps_per_epoch
    warmup = warmup_steps(config, steps_per_epoch)
    if config.schedule == "onecycle":
        pct = warmup / total if warmup > 0 else 0.3
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=config.lr,
            total_steps=total,
            pct_start=min(max(pct, 1.0 / total), 1.0 - 1.0 / total) if total > 1 else 0.5,
            cycle_momentum=False,
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _factor_fn(config.schedule, total, warmup))
