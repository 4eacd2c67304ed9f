"""Sparse training callbacks: fixed random masks, SET and RigL, at an exact sparsity throughout.

- :class:`StaticSparse`: random masks at the layer distribution, fixed for the whole run (the
  baseline that tells whether moving the masks helps at all).
- :class:`SET`: every ``delta_t`` steps drop the active weights of smallest magnitude and regrow
  as many at random (Mocanu et al. 2018, "Scalable training of artificial neural networks with
  adaptive sparse connectivity", arXiv:1707.04780). It uses RigL's cosine drop schedule and
  drops by ``|w|`` (Mocanu et al. drop a fraction of each sign separately), so the two differ
  only in how they regrow, as in the comparisons of Evci et al.
- :class:`RigL`: the same, but regrow where the dense gradient is largest (Evci et al. 2020,
  "Rigging the Lottery: Making All Tickets Winners", arXiv:1911.11134). Its grown weights
  survive the next drop more often than SET's, but it keeps returning to weights it used
  before, so SET ends having tried more of them (resnet20 on Fashion-MNIST: 80% of the weights
  against 63% at 80% sparsity), and there the two end level (docs/benchmarks.md).

The masks are the ``weight_mask`` buffers of :mod:`slimtorch.prune.buffers`, so the callbacks
keep them exact the way :class:`~slimtorch.prune.MaskCallback` does (they subclass it), and
``save_model``/``load_model``, checkpoints and compact storage work unchanged. Each layer holds
exactly its target count of active weights after every update and optimiser step.

How an update works, at optimiser step ``t`` with ``t % delta_t == 0``, ``0 < t < T_end``:

1. ``on_before_optimizer_step`` (gradients unscaled, already averaged over DDP ranks): RigL
   copies ``|grad|`` of each sparse weight. The weights are masked by zeroing, not by a
   multiplication in the forward pass, so this gradient is dense; it is read before the masked
   entries of the gradient are zeroed.
2. The optimiser steps with the old masks (the authors' reference implementation skips the
   optimiser step at an update step: one step in ``delta_t`` differs).
3. ``on_after_optimizer_step``: if the step was skipped (fp16 gradient scaler found inf/NaN) or
   the gradients were not finite, the update is skipped too. Otherwise each layer swaps
   ``floor(f(t) * k)`` weights; grown weights start at zero and their optimiser state (SGD
   ``momentum_buffer``, Adam ``exp_avg``/``exp_avg_sq``) is reset; dropped weights and their
   state are zeroed. The update's record in ``updates`` holds its step, drop fraction and swap
   count, the fraction of the sparse layers' weights active at any time so far (``explored``,
   the in-time over-parameterisation rate of Liu et al. 2021, arXiv:2102.02887) and the share
   of the previous update's grown weights still active after this one (``grown_kept``; see
   :class:`~slimtorch.sparse.updates.Exploration`).

Between updates the only work is the masking every static mask needs. SET draws its random
numbers from a CPU ``torch.Generator`` seeded by ``config.seed``, identical on every rank.

To resume from a checkpoint the fresh model needs the mask buffers first; the callback's
``setup`` adds them before ``Trainer.fit(..., resume=True)`` loads the checkpoint (calling
``callback.init_masks_(model)`` beforehand, on the same callback, does the same). A model that
already holds pruning masks is refused rather than given new random ones.

Example:
    >>> cb = make_sparse_callback("rigl", 0.9, delta_t=100)
    >>> Trainer(model, cfg, callbacks=[cb]).fit(loader)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from glob import escape
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from slimtorch.core.errors import TransformSkipError
from slimtorch.core.globs import untargeted_layers
from slimtorch.core.surgery import parameter_sharing
from slimtorch.prune.buffers import get_mask
from slimtorch.prune.callbacks import MaskCallback
from slimtorch.prune.magnitude import MagnitudeConfig, prune_
from slimtorch.sparse._select import layer_weight, select_layers
from slimtorch.sparse.config import SparseTrainingConfig
from slimtorch.sparse.distribution import exact_nonzeros, random_mask, scale_to_active_fan_in_
from slimtorch.sparse.updates import (
    Exploration,
    cosine_drop_fraction,
    drop_and_grow,
    drop_count,
)

if TYPE_CHECKING:
    from slimtorch.train.trainer import Trainer

logger = logging.getLogger(__name__)

KINDS = ("static", "set", "rigl")


class StaticSparse(MaskCallback):
    """Random masks at the configured distribution, fixed for the whole run.

    Args:
        config: Sparsity, distribution and schedule (the schedule is unused here).
        include: Globs of layer names to make sparse (all conv/linear layers when ``None``).
        exclude: Globs of layer names to leave dense (and out of the budget).
        total_steps: Optimiser steps of the run (``T_end = t_end * total_steps``); ``None``
            takes ``epochs * steps_per_epoch`` from the trainer.

    Example:
        >>> net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> cb = StaticSparse(SparseTrainingConfig(sparsity=0.75, distribution="uniform"))
        >>> cb.init_masks_(net)
        {'0': 256, '2': 32}
    """

    kind = "static"
    run_fields = ("include", "exclude", "total_steps")

    def __init__(
        self,
        config: SparseTrainingConfig | None = None,
        *,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        total_steps: int | None = None,
    ) -> None:
        super().__init__()
        config = SparseTrainingConfig() if config is None else config
        if not isinstance(config, SparseTrainingConfig):
            raise TypeError(f"config must be a SparseTrainingConfig, got {type(config).__name__}")
        if total_steps is not None and (
            isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1
        ):
            raise ValueError(f"total_steps must be an integer >= 1 or None, got {total_steps!r}")
        self.config = config
        self.include = include
        self.exclude = exclude
        self.total_steps = total_steps
        self.step_end = 0
        self.initialised = False
        self.nonzeros: dict[str, int] = {}
        self.updates: list[dict[str, Any]] = []
        self.skipped_updates: list[int] = []
        self.generator = torch.Generator()

    # ------------------------------------------------------------------ masks

    def plan(self, model: nn.Module) -> dict[str, int]:
        """Layer name -> exact number of active weights at the configured distribution.

        Raises:
            ValueError: no conv/linear layer is targeted, the distribution is impossible, a
                layer would keep less than one weight (the sparsity could not be exact), or
                targeted layers share parameters.

        Example:
            >>> net = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
            >>> StaticSparse(SparseTrainingConfig(sparsity=0.9, dense_last=True)).plan(net)
            {'0': 4250, '2': 2560}
        """
        layers = select_layers(model, self.include, self.exclude)
        if not layers:
            raise ValueError(
                f"no nn.Conv2d/nn.Linear layer of {type(model).__name__} matches "
                f"include={self.include}, exclude={self.exclude}"
            )
        shared, targeted = parameter_sharing(model), {name for name, _ in layers}
        tied = {  # a tie with an excluded layer is fine: it uses the masked weight
            name: owners
            for name, _ in layers
            if (owners := [o for o in shared(name) if o.rpartition(".")[0] in targeted])
        }
        if tied:  # one weight under two masks, counted twice in the distribution
            listing = "; ".join(f"{n!r} shares {', '.join(o)}" for n, o in tied.items())
            raise ValueError(
                f"sparse training keeps one mask per layer, and these layers share parameters "
                f"(tied weights, or one module under two names): {listing}; exclude all but one"
            )
        shapes = {name: tuple(layer_weight(m).shape) for name, m in layers}
        dense = set()
        if self.config.dense_first:
            dense.add(layers[0][0])
        if self.config.dense_last:
            dense.add(layers[-1][0])
        return exact_nonzeros(shapes, self.config.sparsity, self.config.distribution, dense=dense)

    @torch.no_grad()
    def init_masks_(self, model: nn.Module) -> dict[str, int]:
        """Add ``weight_mask`` buffers with random masks at the planned counts, zero the rest.

        Also needed on a fresh model before resuming (the checkpoint then overwrites them).

        Raises:
            ValueError: the plan is impossible (see :meth:`plan`), or a targeted layer already
                holds a pruning mask with pruned entries (new random masks would discard the
                weights it keeps); the model is then left unchanged.

        Returns:
            Layer name -> active weights.

        Example:
            >>> cb = StaticSparse(SparseTrainingConfig(sparsity=0.5, distribution="uniform"))
            >>> lin = nn.Sequential(nn.Linear(8, 8))
            >>> cb.init_masks_(lin), int((lin[0].weight == 0).sum())
            ({'0': 32}, 32)
        """
        plan = self.plan(model)
        pruned = {}
        for name in plan:
            old = get_mask(model.get_submodule(name))
            if old is not None and not bool(old.all()):
                pruned[name] = f"{int(old.sum())} of {old.numel()} active"
        if pruned:  # new random masks would zero most of the weights those masks kept
            listing = ", ".join(f"{n!r} ({what})" for n, what in pruned.items())
            raise ValueError(
                f"layer(s) {listing} already hold pruning masks; {type(self).__name__} draws new "
                "random masks and would zero the weights they keep. Resume the sparse run from "
                "its checkpoint, fine-tune the pruned model with MaskCallback, or start from "
                "the dense model"
            )
        names = list(plan)
        # all-True buffers and the "prune.masks" record, so save_model/load_model keep them;
        # strict: a layer that cannot take a mask stops it before any layer changes
        try:  # names escaped: they are exact, and '[' in a ModuleDict key is no glob
            prune_(model, MagnitudeConfig(sparsity=0.0), include=[escape(n) for n in names],
                   strict=True)  # fmt: skip
        except TransformSkipError as exc:
            raise ValueError(f"{type(self).__name__} cannot mask every layer: {exc}") from None
        if others := untargeted_layers(model, self.include, self.exclude):
            logger.warning("%s: sparse layers are nn.Conv2d/nn.Linear only; left dense: %s",
                           type(self).__name__, ", ".join(others))  # fmt: skip
        self.nonzeros, self.updates, self.skipped_updates = plan, [], []  # a new run
        self.generator.manual_seed(self.config.seed)
        for name in names:
            module = model.get_submodule(name)
            mask = get_mask(module)
            assert mask is not None
            new = random_mask(mask.shape, self.nonzeros[name], self.generator)
            mask.copy_(new.to(mask.device))
            weight = layer_weight(module)
            weight.masked_fill_(~mask, 0.0)
            if self.config.scale_init:
                scale_to_active_fan_in_(weight, mask)
        self.initialised = True
        return dict(self.nonzeros)

    def summary(self, model: nn.Module) -> dict[str, dict[str, int]]:
        """Per sparse layer: weights, target and actual active count, nonzeros where masked.

        Example:
            >>> net = nn.Sequential(nn.Linear(8, 8))
            >>> cb = StaticSparse(SparseTrainingConfig(sparsity=0.5))
            >>> _ = cb.init_masks_(net)
            >>> cb.summary(net)["0"]
            {'numel': 64, 'target': 32, 'active': 32, 'nonzero_masked': 0}
        """
        out = {}
        for name, target in self.nonzeros.items():
            module = model.get_submodule(name)
            mask = get_mask(module)
            if mask is None:
                raise ValueError(f"layer {name!r} has no weight_mask; call init_masks_ first")
            out[name] = {
                "numel": mask.numel(),
                "target": target,
                "active": int(mask.sum()),
                "nonzero_masked": int((layer_weight(module).detach()[~mask] != 0).sum()),
            }
        return out

    # ------------------------------------------------------------------ schedule

    def is_update_step(self, step: int) -> bool:
        """Whether the masks change after optimiser step ``step`` (never for static masks)."""
        return False

    def drop_fraction(self, step: int) -> float:
        """The cosine drop fraction at ``step`` (0 from ``T_end`` on)."""
        return cosine_drop_fraction(step, self.config.alpha, self.step_end)

    # ------------------------------------------------------------------ hooks

    def _set_step_end(self, trainer: Trainer) -> int:
        """Set the step after which masks stay fixed; returns the run's total steps."""
        total = self.total_steps or trainer.config.epochs * trainer.steps_per_epoch
        self.step_end = int(self.config.t_end * total)
        return total

    def setup(self, trainer: Trainer) -> None:
        """Add the masks before a checkpoint is resumed (its state then replaces them)."""
        total = self._set_step_end(trainer)
        if self.kind != "static" and not self.is_update_step(self.config.delta_t):
            raise ValueError(
                f"{self.kind} would never move its masks: the first update is at step "
                f"{self.config.delta_t} (delta_t) but updates stop at step {self.step_end} "
                f"(t_end={self.config.t_end:g} of {total} steps); "
                + (f"lower delta_t below {self.step_end}, " if self.step_end > 1 else "")
                + "train longer, raise t_end, or use static masks"
            )
        model = trainer.model  # a callback used before may meet a fresh model: masks it
        if not self.initialised or any(get_mask(model.get_submodule(n)) is None
                                       for n in self.plan(model)):  # fmt: skip
            self.init_masks_(model)

    def on_fit_start(self, trainer: Trainer) -> None:
        others = [cb for cb in trainer.callbacks if cb is not self and isinstance(cb, MaskCallback)]
        if others:
            raise ValueError(
                f"{type(self).__name__} already keeps the masks exact; remove the other mask "
                f"callback(s) {[type(cb).__name__ for cb in others]} from the trainer"
            )
        model = trainer.unwrapped_model
        self._set_step_end(trainer)
        if self.initialised:
            plan = self.plan(model)
            for name, target in plan.items():
                mask = get_mask(model.get_submodule(name))
                if mask is None or int(mask.sum()) != target:
                    raise ValueError(
                        f"layer {name!r} should hold {target} active weights but its mask "
                        f"{'is missing' if mask is None else f'holds {int(mask.sum())}'}; "
                        "resume with the same model and config, or start a new run"
                    )
            self.nonzeros = plan
        else:
            self.init_masks_(model)
        super().on_fit_start(trainer)
        logger.info(
            "%s sparse training: %d layer(s), %d/%d weights active, updates until step %d",
            self.kind,
            len(self.nonzeros),
            sum(self.nonzeros.values()),
            sum(layer_weight(model.get_submodule(n)).numel() for n in self.nonzeros),
            self.step_end,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "initialised": self.initialised,
            "step_end": self.step_end,
            "updates": [dict(u) for u in self.updates],
            "skipped_updates": list(self.skipped_updates),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.initialised = bool(state.get("initialised", False))
        self.step_end = int(state.get("step_end", 0))
        self.updates = [dict(u) for u in state.get("updates", [])]
        self.skipped_updates = [int(s) for s in state.get("skipped_updates", [])]
        if "generator" in state:
            self.generator.set_state(state["generator"])


class SET(StaticSparse):
    """Drop the smallest-magnitude weights every ``delta_t`` steps, regrow as many at random.

    Mocanu et al. 2018 (arXiv:1707.04780), with RigL's cosine drop schedule. Layers without a
    gradient at an update step (frozen, or unused by that batch) keep their masks.

    Example:
        >>> cb = SET(SparseTrainingConfig(sparsity=0.9, delta_t=10, t_end=0.5), total_steps=100)
        >>> cb.step_end = 50
        >>> [t for t in range(60) if cb.is_update_step(t)]
        [10, 20, 30, 40]
    """

    kind = "set"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending: dict[str, torch.Tensor | None] | None = None
        self._scale_before: float | None = None
        self._finite: torch.Tensor | None = None
        self.exploration = Exploration()

    def init_masks_(self, model: nn.Module) -> dict[str, int]:
        out = super().init_masks_(model)
        self.exploration = Exploration()  # a new run
        return out

    def is_update_step(self, step: int) -> bool:
        return 0 < step < self.step_end and step % self.config.delta_t == 0

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "exploration": self.exploration.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.exploration = Exploration()
        self.exploration.load_state_dict(state.get("exploration", {}))

    def collect(self, model: nn.Module) -> dict[str, torch.Tensor | None]:
        """What the update needs from before the optimiser step (nothing for SET)."""
        return {}

    def grow_scores(
        self, name: str, module: nn.Module, pending: dict[str, torch.Tensor | None]
    ) -> torch.Tensor | None:
        """Scores of the inactive weights; the highest are grown (random for SET)."""
        w = layer_weight(module)
        if not w.requires_grad or w.grad is None:  # frozen or unused: regrown zeros never train
            return None
        return torch.rand(w.shape, generator=self.generator).to(w.device)

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: Trainer, optimizer: torch.optim.Optimizer) -> None:
        if self.is_update_step(trainer.global_step):
            self._finite = None
            self._pending = self.collect(trainer.unwrapped_model)
            scaler = trainer.scaler
            self._scale_before = scaler.get_scale() if scaler is not None else None
        super().on_before_optimizer_step(trainer, optimizer)

    @torch.no_grad()
    def on_after_optimizer_step(self, trainer: Trainer) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            step = trainer.global_step
            scaler = trainer.scaler
            before = self._scale_before
            skipped = scaler is not None and before is not None and scaler.get_scale() < before
            if self._finite is not None and not bool(self._finite):
                skipped = True
            if skipped:
                self.skipped_updates.append(step)
                logger.info("step %d: gradients not finite, mask update skipped", step)
            else:
                self.update_masks_(trainer, pending)
        super().on_after_optimizer_step(trainer)

    @torch.no_grad()
    def update_masks_(self, trainer: Trainer, pending: dict[str, torch.Tensor | None]) -> int:
        """Drop and grow in every sparse layer at ``trainer.global_step``; returns the swaps."""
        step = trainer.global_step
        fraction = self.drop_fraction(step)
        model, optimizer = trainer.unwrapped_model, trainer.optimizer
        swapped = 0
        for name, target in self.nonzeros.items():
            module = model.get_submodule(name)
            mask = get_mask(module)
            assert mask is not None
            scores = self.grow_scores(name, module, pending)
            n = drop_count(target, fraction)
            if scores is None or n == 0:
                self.exploration.record(name, mask, None)
                continue
            weight = layer_weight(module)
            new = drop_and_grow(weight, mask, scores, n)
            grown = new & ~mask
            weight.masked_fill_(grown, 0.0)
            state = optimizer.state.get(weight, {}) if optimizer is not None else {}
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.shape == grown.shape:
                    value.masked_fill_(grown, 0.0)
            self.exploration.record(name, mask, new)
            mask.copy_(new)
            swapped += int(grown.sum())
        record = {"step": step, "fraction": fraction, "swapped": swapped}
        self.updates.append({**record, **self.exploration.close()})
        logger.debug("step %d: %s swapped %d weights (f=%.4f)", step, self.kind, swapped, fraction)
        return swapped


class RigL(SET):
    """Drop the smallest-magnitude weights every ``delta_t`` steps, regrow by dense gradient.

    Evci et al. 2020 (arXiv:1911.11134). Layers without a gradient at an update step keep
    their masks.

    Example:
        >>> cb = RigL(SparseTrainingConfig(sparsity=0.9, delta_t=100, alpha=0.3))
        >>> cb.step_end = 750
        >>> round(cb.drop_fraction(375), 3)
        0.15
    """

    kind = "rigl"

    def collect(self, model: nn.Module) -> dict[str, torch.Tensor | None]:
        out: dict[str, torch.Tensor | None] = {}
        checks = []
        for name in self.nonzeros:
            grad = layer_weight(model.get_submodule(name)).grad
            if grad is None:
                out[name] = None
                continue
            score = grad.detach().abs().float()  # a copy: the gradient is masked in place next
            checks.append(torch.isfinite(score).all())
            out[name] = score
        if checks:
            self._finite = torch.stack(checks).all().cpu()  # one device sync per update
        return out

    def grow_scores(
        self, name: str, module: nn.Module, pending: dict[str, torch.Tensor | None]
    ) -> torch.Tensor | None:
        return pending.get(name)
