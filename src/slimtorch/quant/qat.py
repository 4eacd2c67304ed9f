"""Quantization-aware training with LSQ, as a Trainer callback, and conversion to int8 Q/DQ.

:func:`prepare_qat_` swaps the targeted ``Conv2d``/``Linear`` layers for LSQ fake-quant layers
(:mod:`slimtorch.quant.lsq`, Esser et al. 2020, arXiv:1902.08153); :class:`QATCallback` runs the
phases during :meth:`Trainer.fit` (it prepares the model itself when given an unprepared one);
:func:`~slimtorch.quant.qat_convert.convert_qat_` turns the trained model into the same int8
Q/DQ model that post-training quantization produces (:func:`slimtorch.quant.to_qdq_`;
integer-arithmetic inference as in Jacob et al. 2018, arXiv:1712.05877), with the learned weight
steps as per-channel weight scales and the learned activation steps as input scales.

Batch norm: folded *before* QAT (``QATConfig.fold_bn=True``, the default) with
:func:`slimtorch.quant.fold.fold_bn_`, rather than simulated during training as Jacob et al. do
(a second convolution per layer to get batch statistics, then a correction of the folded
weights). Reasons: QAT here fine-tunes an already trained model for a few epochs, where batch
statistics add little; the weights being fake-quantized are then exactly the weights the int8
runtime stores, so the converted model matches the trained one; and each step costs one
convolution instead of two. Training without batch norm is less forgiving of large learning
rates: fine-tune with a small one (about 1/10 to 1/100 of the original). With
``fold_bn=False`` the batch norms stay, train on, and are frozen (eval mode, running statistics
fixed) from epoch ``freeze_bn_epoch`` on; :func:`convert_qat_` then folds them before converting
(the fold changes the scales the weights were trained with, so expect a small mismatch).

Example:
    >>> from slimtorch.models import create_model
    >>> from slimtorch.train import TrainConfig, Trainer
    >>> model = create_model("lenet5", in_channels=1, input_size=28)
    >>> loader = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(2)]
    >>> cfg = QATConfig(weight_bits=4, act_bits=8)
    >>> len(prepare_qat_(model, cfg).layers)
    5
    >>> train_cfg = TrainConfig(epochs=3, lr=0.005, progress=False)
    >>> Trainer(model, train_cfg, callbacks=[QATCallback(cfg)]).fit(loader).epoch
    [1, 2, 3]
    >>> report = convert_qat_(model)  # int8 Q/DQ layers, same path as PTQ
    >>> len(report.quantized), type(model.fc1).__name__
    (5, 'QDQLinear')
"""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
import logging
import math
import statistics
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from slimtorch.core.config import Config, check_bool, check_choice
from slimtorch.core.surgery import (
    refuse_sparse_kernels,
    replacement_blockers,
    require_float32,
    require_submodules,
    require_values,
)
from slimtorch.models.transforms import ARCH_TRANSFORMS
from slimtorch.prune.buffers import mask_grads_
from slimtorch.quant.fold import FoldReport, fold_bn_
from slimtorch.quant.lsq import WEIGHT_INITS, LSQActQuantizer, LSQConv2d, LSQLinear
from slimtorch.quant.ptq import _not_targeted_reason
from slimtorch.quant.qdq import QDQConv2d, QDQLinear
from slimtorch.train.callbacks import Callback

if TYPE_CHECKING:
    from slimtorch.train.trainer import Trainer

logger = logging.getLogger(__name__)

TRANSFORM_NAME = "quant.lsq"
"""Architecture transform recorded by :func:`prepare_qat_` (removed again by convert)."""

_LSQ = (LSQConv2d, LSQLinear)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QATConfig(Config):
    """How to run LSQ quantization-aware training.

    Attributes:
        weight_bits: Weight bits, 8 or 4 (signed, per output channel).
        act_bits: Input-activation bits, 8 or 4; ``None`` quantizes weights only.
        include: Globs of Conv2d/Linear names to quantize (``None``: all).
        exclude: Globs of names to keep in float.
        fold_bn: Fold Conv2d+BatchNorm2d pairs before QAT (see the module docstring).
        freeze_bn_epoch: With ``fold_bn=False``, epoch (0-based) from which batch norms stop
            updating their running statistics; ``None`` never.
        weight_init: ``"lsq"`` (paper) or ``"minmax"`` initial weight steps.
        spike_clip: :class:`QATCallback` clips the global gradient L2 norm to this many times
            the median norm of the last :data:`SPIKE_WINDOW` steps (from step
            :data:`SPIKE_WARMUP` on), unless the ``TrainConfig`` clips already; ``None``: never.
            LSQ step sizes are small (a few thousandths for 4-bit weights) and a gradient spike
            carried by momentum can push them through zero (when the forward pass clamped them
            there, as it did before :func:`~slimtorch.quant.lsq.step_scale`, the layer's
            weights then stayed quantized to zero). resnet20 on
            Fashion-MNIST, 4-bit weights, distilled from the float model (temperature 4),
            learning rate 0.01: unclipped, the gradient norm went from 9 to 80-960 around
            step 61, the steps of three layers went negative and the model ended at 10%. A
            fixed clip at norm 5 saved that run but slowed plain QAT (10 epochs: 94.05% against
            94.22-94.25% unclipped), so only spikes are clipped.
    """

    weight_bits: int = 8
    act_bits: int | None = 8
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    fold_bn: bool = True
    freeze_bn_epoch: int | None = None
    weight_init: str = "lsq"
    spike_clip: float | None = 3.0

    def __post_init__(self) -> None:
        check_choice(self, "weight_bits", self.weight_bits, (4, 8))
        check_choice(self, "act_bits", self.act_bits, (4, 8, None))
        for field in ("include", "exclude"):
            value = getattr(self, field)
            if value is None and field == "include":
                continue
            if isinstance(value, str) or not isinstance(value, tuple | list):
                raise ValueError(
                    f"QATConfig.{field} must be a tuple of glob strings, got {value!r}"
                )
            if not all(isinstance(p, str) for p in value):
                raise ValueError(f"QATConfig.{field} must hold strings only, got {value!r}")
            object.__setattr__(self, field, tuple(value))
        check_bool(self, "fold_bn", self.fold_bn)
        if self.freeze_bn_epoch is not None and self.fold_bn:
            raise ValueError(
                "QATConfig.freeze_bn_epoch applies with fold_bn=False only (folded batch norms "
                f"have nothing to freeze), got freeze_bn_epoch={self.freeze_bn_epoch!r} with "
                "fold_bn=True"
            )
        if self.freeze_bn_epoch is not None and (
            isinstance(self.freeze_bn_epoch, bool)
            or not isinstance(self.freeze_bn_epoch, int)
            or self.freeze_bn_epoch < 0
        ):
            raise ValueError(
                f"QATConfig.freeze_bn_epoch must be None or an int >= 0, got "
                f"{self.freeze_bn_epoch!r}"
            )
        check_choice(self, "weight_init", self.weight_init, WEIGHT_INITS)
        clip = self.spike_clip
        if clip is not None and (
            isinstance(clip, bool) or not isinstance(clip, int | float) or not 1 <= clip < math.inf
        ):
            raise ValueError(f"QATConfig.spike_clip must be None or a number >= 1, got {clip!r}")
        if clip is not None:
            object.__setattr__(self, "spike_clip", float(clip))


@dataclasses.dataclass
class QATReport:
    """What :func:`prepare_qat_` did: the fold report and the layers given fake quantizers."""

    config: dict[str, Any]
    layers: list[str]
    skipped: dict[str, str]
    fold: FoldReport | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "method": "qat",
            "config": self.config,
            "layers": list(self.layers),
            "skipped": dict(self.skipped),
            "fold": None if self.fold is None else self.fold.to_dict(),
        }

    def to_table(self) -> str:
        """One line per layer: fake-quantized or skipped (with the reason)."""
        bits = f"W{self.config.get('weight_bits')}A{self.config.get('act_bits')}"
        lines = [f"{'layer':<32} action"]
        lines += [f"{name:<32} lsq {bits}" for name in self.layers]
        lines += [f"{name:<32} skipped: {why}" for name, why in self.skipped.items()]
        if self.fold is not None:
            lines.append(f"batch norms folded: {len(self.fold.folded)}")
        return "\n".join(lines)


def _selected(name: str, config: QATConfig) -> bool:
    if config.include is not None and not any(fnmatch.fnmatchcase(name, p) for p in config.include):
        return False
    return not any(fnmatch.fnmatchcase(name, p) for p in config.exclude)


def qat_layers(model: nn.Module) -> dict[str, LSQConv2d | LSQLinear]:
    """The LSQ fake-quant layers of ``model`` by dotted name.

    Example:
        >>> from slimtorch.models import create_model
        >>> model = create_model("lenet5", in_channels=1, input_size=28)
        >>> _ = prepare_qat_(model, QATConfig())
        >>> sorted(qat_layers(model))
        ['classifier', 'fc1', 'fc2', 'features.0', 'features.3']
    """
    return {n: m for n, m in model.named_modules() if isinstance(m, _LSQ)}


def _swap(model: nn.Module, config: QATConfig) -> tuple[list[str], dict[str, str]]:
    layers: list[str] = []
    skipped: dict[str, str] = {}
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if name and _selected(name, config) and type(module) in (nn.Conv2d, nn.Linear)
    ]
    blocked = replacement_blockers(model, candidates)
    for name, module in list(model.named_modules()):
        if not name or not _selected(name, config) or isinstance(module, _LSQ):
            continue
        if name in blocked:
            skipped[name] = blocked[name]
            continue
        new: nn.Module
        kw: dict[str, Any] = {"weight_bits": config.weight_bits, "act_bits": config.act_bits}
        if type(module) is nn.Conv2d:
            if module.padding_mode != "zeros" or isinstance(module.padding, str):
                skipped[name] = "non-zero or string padding has no Q/DQ int8 equivalent; kept float"
                continue
            new = LSQConv2d.from_float(module, weight_init=config.weight_init, **kw)
        elif type(module) is nn.Linear:
            new = LSQLinear.from_float(module, weight_init=config.weight_init, **kw)
        else:
            if (reason := _not_targeted_reason(module)) is not None:
                skipped[name] = reason
            continue
        if not bool(torch.isfinite(module.weight).all()):
            skipped[name] = "weight holds NaN/Inf; fix the layer first"
            continue
        model.set_submodule(name, new)
        layers.append(name)
    return layers, skipped


def prepare_qat_(model: nn.Module, config: QATConfig) -> QATReport:
    """Fold batch norms (when configured) and swap targeted layers for LSQ fake-quant layers.

    Call it before building the :class:`~slimtorch.train.Trainer` (the optimiser must see the
    new step-size parameters), or let :class:`QATCallback` do it on fit start. Weights keep
    their parameter objects; activation steps are initialised by the first batch that runs.
    The change is recorded (``"quant.lsq"``) so a QAT checkpoint saved with ``save_model``
    loads back with its quantizers.

    Args:
        model: A trained float model, changed in place.
        config: The :class:`QATConfig`.

    Returns:
        A :class:`QATReport`.

    Raises:
        TypeError: ``config`` is not a ``QATConfig``.
        ValueError: The model is already prepared, or ``include`` matches no layer.

    Example:
        >>> from slimtorch.models import create_model
        >>> model = create_model("resnet20", in_channels=1, input_size=28).eval()
        >>> len(prepare_qat_(model, QATConfig(weight_bits=4)).layers)
        22
    """
    require_values(model, "prepare_qat_")
    refuse_sparse_kernels(model, "prepare_qat_")
    require_submodules(model, "prepare_qat_")
    require_float32(model, "prepare_qat_", "train the float32 model")
    if not isinstance(config, QATConfig):
        raise TypeError(f"config must be a QATConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if qat_layers(model):
        raise ValueError(
            "the model already holds LSQ fake-quant layers; prepare it once, or call "
            "convert_qat_ first"
        )
    int8 = [n for n, m in model.named_modules() if isinstance(m, QDQConv2d | QDQLinear)]
    if int8:
        raise ValueError(
            f"the model already holds int8 Q/DQ layers ({', '.join(int8[:6])}"
            f"{', ...' if len(int8) > 6 else ''}); QAT starts from the float model"
        )
    if config.include is not None and not any(
        name and _selected(name, config) and type(m) in (nn.Conv2d, nn.Linear)
        for name, m in model.named_modules()
    ):  # before anything is folded: an error leaves the model as it was
        raise ValueError(
            f"QATConfig.include={config.include!r} matches no Conv2d/Linear layer of "
            f"{type(model).__name__}; check the dotted names with model.named_modules()"
        )
    fold = fold_bn_(model) if config.fold_bn else None
    layers, skipped = _swap(model, config)
    arch = getattr(model, "slimtorch_arch", None)
    if layers and isinstance(arch, dict):
        params = {"config": config.to_dict(), "layers": layers}
        arch.setdefault("transforms", []).append({"name": TRANSFORM_NAME, "params": params})
    for name, reason in skipped.items():
        logger.warning("prepare_qat_: %s skipped: %s", name, reason)
    logger.info("prepare_qat_: %d layer(s) get LSQ fake quantization", len(layers))
    return QATReport(
        config={"type": "QATConfig", **config.to_dict()}, layers=layers, skipped=skipped, fold=fold
    )


def _replay_lsq(model: nn.Module, params: dict[str, Any]) -> None:
    saved = dict(params["config"])
    if saved.get("fold_bn", True) and saved.get("freeze_bn_epoch") is not None:
        saved["freeze_bn_epoch"] = None  # recorded by older versions, where it did nothing
    config = QATConfig.from_dict(saved)
    layers = params["layers"]
    for name in layers:
        module = model.get_submodule(name)
        kw: dict[str, Any] = {"weight_bits": config.weight_bits, "act_bits": config.act_bits}
        if type(module) is nn.Conv2d:
            model.set_submodule(name, LSQConv2d.from_float(module, **kw))
        elif type(module) is nn.Linear:
            model.set_submodule(name, LSQLinear.from_float(module, **kw))
        else:
            raise ValueError(f"{name!r} is a {type(module).__name__}, expected Conv2d/Linear")


if TRANSFORM_NAME not in ARCH_TRANSFORMS:
    ARCH_TRANSFORMS.add(TRANSFORM_NAME, _replay_lsq)


SPIKE_WINDOW = 50
"""Optimiser steps whose gradient norms set the median that ``QATConfig.spike_clip`` scales."""

SPIKE_WARMUP = 10
"""Steps seen before spike clipping starts."""


class QATCallback(Callback):
    """Runs LSQ quantization-aware training inside :meth:`Trainer.fit`.

    In the Trainer's ``setup`` hook (before the optimiser is built, the model is wrapped for
    DDP and a checkpoint is resumed) an unprepared model is prepared with :func:`prepare_qat_`,
    so the step sizes train and resume like any parameter. After the first batch under DDP,
    activation steps (initialised from each rank's own batch) are averaged over ranks. With
    ``fold_bn=False`` batch norms are frozen from ``freeze_bn_epoch`` on. Before every optimiser
    step a gradient norm above ``config.spike_clip`` times the recent median is clipped to it
    when the ``TrainConfig`` does not clip (``clipped``: how many steps were).

    Args:
        config: The :class:`QATConfig` (the same one given to :func:`prepare_qat_`).

    Example:
        >>> from slimtorch.models import create_model
        >>> from slimtorch.train import TrainConfig, Trainer
        >>> model = create_model("lenet5", in_channels=1, input_size=28)  # not prepared
        >>> data = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(3)]
        >>> train_loader, val_loader = data[:2], data[2:]
        >>> callback = QATCallback(QATConfig(weight_bits=4, act_bits=8))
        >>> train_cfg = TrainConfig(epochs=2, lr=0.01, progress=False)
        >>> history = Trainer(model, train_cfg, callbacks=[callback]).fit(train_loader, val_loader)
        >>> history.epoch, len(callback.report.layers), len(qat_layers(model))
        ([1, 2], 5, 5)
    """

    def __init__(self, config: QATConfig) -> None:
        if not isinstance(config, QATConfig):
            raise TypeError(f"config must be a QATConfig, got {type(config).__name__}")
        self.config = config
        self.synced = False
        self.report: QATReport | None = None
        self.clipped = 0
        self.norms: collections.deque[float] = collections.deque(maxlen=SPIKE_WINDOW)

    def setup(self, trainer: Trainer) -> None:
        """Swap in the LSQ layers before the optimiser, DDP and a resumed checkpoint see them."""
        model = trainer.model
        if prepared := qat_layers(model):  # prepared before: it must be by this config
            want = {"weight_bits": self.config.weight_bits, "act_bits": self.config.act_bits}
            for name, layer in prepared.items():
                spec = layer.lsq_spec()
                if spec != want:
                    raise ValueError(
                        f"layer {name!r} was prepared for QAT as {spec}, but this QATCallback's "
                        f"config asks for {want}; give the callback the config the model was "
                        "prepared with, or an unprepared model"
                    )
            return
        self.report = prepare_qat_(model, self.config)
        logger.info("QATCallback prepared %d layer(s)", len(self.report.layers))

    def on_fit_start(self, trainer: Trainer) -> None:
        epoch = self.config.freeze_bn_epoch
        if epoch is not None and epoch >= trainer.config.epochs:
            logger.warning("QAT: freeze_bn_epoch=%d is past the last epoch (%d epochs): batch "
                           "norms are never frozen", epoch, trainer.config.epochs)  # fmt: skip

    def on_train_epoch_start(self, trainer: Trainer) -> None:
        epoch = self.config.freeze_bn_epoch
        if self.config.fold_bn or epoch is None or trainer.epoch < epoch:
            return
        for m in trainer.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()

    def on_train_batch_end(
        self, trainer: Trainer, outputs: torch.Tensor, loss: torch.Tensor, batch_idx: int
    ) -> None:
        if self.synced:
            return
        self.synced = True
        if not trainer.is_distributed:
            return
        from slimtorch.train.distributed import all_reduce_sum, get_world_size

        with torch.no_grad():
            for m in trainer.model.modules():
                if isinstance(m, LSQActQuantizer):
                    m.step.copy_(all_reduce_sum(m.step.detach().clone()) / get_world_size())

    def on_before_optimizer_step(self, trainer: Trainer, optimizer: torch.optim.Optimizer) -> None:
        factor = self.config.spike_clip
        if factor is None or trainer.config.grad_clip_norm is not None:
            return  # the Trainer clips (at its own limit) right after this hook
        # pruned entries' gradients are zeroed before the step anyway (MaskCallback): zero
        # them first, so the norm does not depend on the order of the callbacks
        mask_grads_(trainer.unwrapped_model)
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = float(nn.utils.clip_grad_norm_(params, math.inf))  # measures, scales nothing
        if not math.isfinite(norm):
            return  # an fp16 overflow: the gradient scaler skips this step
        if len(self.norms) >= SPIKE_WARMUP:
            limit = factor * statistics.median(self.norms)
            if norm > limit:
                nn.utils.clip_grad_norm_(params, limit)
                self.clipped += 1
        self.norms.append(norm)

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.clipped:
            logger.info(
                "QAT: %d gradient spike(s) clipped to %g x the recent median norm",
                self.clipped, self.config.spike_clip,
            )  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {"synced": self.synced, "clipped": self.clipped, "norms": list(self.norms)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.synced = bool(state.get("synced", False))
        self.clipped = int(state.get("clipped", 0))
        self.norms = collections.deque(
            (float(n) for n in state.get("norms", [])), maxlen=SPIKE_WINDOW
        )
