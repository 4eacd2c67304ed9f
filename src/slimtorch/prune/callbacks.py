"""Training callbacks for pruning: keep masks exact while fine-tuning, and prune gradually.

:class:`MaskCallback` keeps pruned weights at exactly zero through any optimiser (momentum,
weight decay, Adam moments) and mixed precision. :class:`GradualPruning` raises the sparsity
over training with the cubic schedule of Zhu & Gupta 2017 ("To prune, or not to prune",
arXiv:1710.01878)::

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3,   t in {t0, t0 + dt, ..., t0 + n*dt}

with ``t0 = start_step``, ``dt = frequency`` and ``t0 + n*dt = end_step``. Iterative
prune-retrain (Han et al. 2015, arXiv:1506.02626) is the special case of a few big steps: set
``frequency`` to several epochs' worth of steps, so each pruning step is followed by a long
stretch of retraining with the masks held fixed.

Both save their state in the Trainer checkpoint. The masks themselves are buffers of the
model: :class:`GradualPruning` adds all-``True`` ones in ``setup``, before ``fit(resume=True)``
loads the checkpoint, so a fresh model resumes as it is; with :class:`MaskCallback` alone the
model must already hold them (prune it, or call
``prune_(model, MagnitudeConfig(sparsity=0.0), include=...)``, before resuming).

Example:
    >>> gradual = GradualPruning(MagnitudeConfig(sparsity=0.9), start_step=0, end_step=100,
    ...                          frequency=10)
    >>> round(gradual.sparsity_at(50), 4)
    0.7875
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from slimtorch.prune.buffers import apply_masks_, mask_grads_, masked_params
from slimtorch.prune.magnitude import MagnitudeConfig, prune_, summary_at_debug
from slimtorch.prune.masks import check_sparsity
from slimtorch.train.callbacks import Callback

if TYPE_CHECKING:
    from slimtorch.train.trainer import Trainer

logger = logging.getLogger(__name__)


class MaskCallback(Callback):
    """Re-apply every mask after each optimiser step, so pruned weights stay exactly zero.

    Before the step the gradients of pruned entries are zeroed; after it the weights and any
    optimiser state of the same shape (SGD momentum, Adam moments) are zeroed where it is False,
    so momentum cannot revive a pruned weight and nothing is left over when a mask changes.

    Example:
        >>> _ = prune_(model, MagnitudeConfig(sparsity=0.8))  # doctest: +SKIP
        >>> Trainer(model, cfg, callbacks=[MaskCallback()]).fit(loader)  # doctest: +SKIP
    """

    run_fields: tuple[str, ...] = ()
    """Attributes that shape the run besides ``config``: saved in the checkpoint, so that a
    resume with other values (another schedule, other layers) is refused."""

    def __init__(self) -> None:
        self.applied = 0

    def run_info(self) -> dict[str, Any] | None:
        info = super().run_info()
        if not self.run_fields:
            return info
        return {**(info or {}), **{name: getattr(self, name) for name in self.run_fields}}

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: Trainer, optimizer: torch.optim.Optimizer) -> None:
        mask_grads_(trainer.unwrapped_model)

    @torch.no_grad()
    def on_after_optimizer_step(self, trainer: Trainer) -> None:
        self.mask_model(trainer)

    @torch.no_grad()
    def mask_model(self, trainer: Trainer) -> None:
        """Apply the masks to the weights and the optimiser state (also at fit start)."""
        model = trainer.unwrapped_model
        apply_masks_(model)
        optimizer = trainer.optimizer
        if optimizer is not None:
            for _, p, mask in masked_params(model):
                for value in optimizer.state.get(p, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == mask.shape:
                        value.masked_fill_(~mask, 0.0)
        self.applied += 1

    def on_fit_start(self, trainer: Trainer) -> None:
        self.mask_model(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"applied": self.applied}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.applied = int(state.get("applied", 0))


def _check_step(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"GradualPruning.{name} must be an integer >= {low}, got {value!r}")
    return value


class GradualPruning(MaskCallback):
    """Raise magnitude sparsity from ``initial_sparsity`` to ``config.sparsity`` during training.

    Pruning happens before the batch at optimiser step ``t`` (``trainer.global_step``) for
    ``t = start_step, start_step + frequency, ...`` up to ``end_step`` (always included); each
    time the masks are recomputed at :meth:`sparsity_at` and combined with the old ones, so
    sparsity only grows. Between pruning steps it keeps the masks exact like
    :class:`MaskCallback`.

    Args:
        config: The final sparsity and the magnitude settings (scope, bias, min_params).
        start_step: First pruning step ``t0`` (>= 0).
        end_step: Last pruning step ``t0 + n*dt`` (>= ``start_step``); the final sparsity is
            reached there, so the run must last beyond it (``fit`` raises otherwise).
        frequency: Steps between pruning steps ``dt`` (>= 1).
        initial_sparsity: ``s_i``, in [0, ``config.sparsity``].
        include: Globs of layer names to prune (as for :func:`prune_`).
        exclude: Globs of layer names to leave dense.

    Example:
        >>> cb = GradualPruning(MagnitudeConfig(sparsity=0.8), start_step=10, end_step=40,
        ...                     frequency=10)
        >>> [round(cb.sparsity_at(t), 4) for t in (0, 10, 20, 40, 99)]
        [0.0, 0.0, 0.563, 0.8, 0.8]
    """

    run_fields = ("start_step", "end_step", "frequency", "initial_sparsity", "include", "exclude")

    def __init__(
        self,
        config: MagnitudeConfig,
        start_step: int,
        end_step: int,
        frequency: int,
        *,
        initial_sparsity: float = 0.0,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(config, MagnitudeConfig):
            raise TypeError(f"config must be a MagnitudeConfig, got {type(config).__name__}")
        self.config = config
        self.start_step = _check_step("start_step", start_step, 0)
        self.end_step = _check_step("end_step", end_step, start_step)
        self.frequency = _check_step("frequency", frequency, 1)
        self.initial_sparsity = check_sparsity(initial_sparsity, "GradualPruning.initial_sparsity")
        if self.initial_sparsity > config.sparsity:
            raise ValueError(
                f"GradualPruning.initial_sparsity ({initial_sparsity}) must be <= the final "
                f"sparsity {config.sparsity}; lower it or raise config.sparsity"
            )
        self.include = include
        self.exclude = exclude
        self.last_step: int | None = None
        self.sparsity = 0.0
        self.history: list[tuple[int, float]] = []

    def sparsity_at(self, step: int) -> float:
        """The scheduled sparsity at optimiser step ``step`` (``s_i`` before ``start_step``,
        ``s_f`` after ``end_step``).

        Example:
            >>> GradualPruning(MagnitudeConfig(sparsity=0.5), 0, 10, 5).sparsity_at(10)
            0.5
        """
        s_i, s_f = self.initial_sparsity, self.config.sparsity
        span = self.end_step - self.start_step
        if step >= self.end_step or span == 0:
            return s_f
        progress = max(0.0, (step - self.start_step) / span)
        return s_f + (s_i - s_f) * (1.0 - progress) ** 3

    def is_pruning_step(self, step: int) -> bool:
        """Whether the masks are recomputed before the batch at ``step``.

        Example:
            >>> cb = GradualPruning(MagnitudeConfig(sparsity=0.5), 2, 9, 3)
            >>> [t for t in range(12) if cb.is_pruning_step(t)]
            [2, 5, 8, 9]
        """
        if not self.start_step <= step <= self.end_step:
            return False
        return (step - self.start_step) % self.frequency == 0 or step == self.end_step

    def setup(self, trainer: Trainer) -> None:
        """Check that the run reaches ``end_step``, then add all-``True`` masks (before a
        checkpoint is resumed, so its mask buffers find their places)."""
        total = trainer.config.epochs * trainer.steps_per_epoch
        if self.end_step >= total:
            raise ValueError(
                f"GradualPruning.end_step={self.end_step} is never reached: the run has {total} "
                f"optimiser steps (0 to {total - 1}), so the final sparsity "
                f"{self.config.sparsity} would not be applied; set end_step <= {total - 1} or "
                "train longer"
            )
        # all-True masks from the start, so every checkpoint holds the same buffers
        prune_(
            trainer.model,
            self.config.replace(sparsity=0.0),
            include=self.include,
            exclude=self.exclude,
        )

    def on_train_batch_start(self, trainer: Trainer, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self.last_step or not self.is_pruning_step(step):
            return
        target = self.sparsity_at(step)
        model = trainer.unwrapped_model
        with summary_at_debug():  # the line below says it, with the step and target
            report = prune_(
                model,
                self.config.replace(sparsity=target),
                include=self.include,
                exclude=self.exclude,
            )
        self.mask_model(trainer)  # clear the optimiser state of newly pruned weights
        self.last_step, self.sparsity = step, target
        self.history.append((step, target))
        total = report.to_dict()["totals"]
        logger.info(
            "gradual pruning at step %d: target %.4f, %d/%d zeros in %d layer(s)%s",
            step,
            target,
            total["zeros_after"],
            total["params"],
            total["pruned"],
            f" ({total['skipped']} skipped)" if total["skipped"] else "",
        )

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.sparsity < self.config.sparsity:  # stopped before end_step (early stopping)
            logger.warning(
                "gradual pruning ended at step %d with sparsity %.4f, short of its target "
                "%.4f (end_step %d was not reached)",
                trainer.global_step, self.sparsity, self.config.sparsity, self.end_step,
            )  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "last_step": self.last_step,
            "sparsity": self.sparsity,
            "history": [list(h) for h in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        last = state.get("last_step")
        self.last_step = None if last is None else int(last)
        self.sparsity = float(state.get("sparsity", 0.0))
        self.history = [(int(t), float(s)) for t, s in state.get("history", [])]
