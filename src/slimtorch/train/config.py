"""The training config: every knob of :class:`~slimtorch.train.Trainer` in one frozen dataclass.

Example:
    >>> cfg = TrainConfig(epochs=5, optimizer="adamw", lr=1e-3, schedule="cosine")
    >>> cfg.replace(amp="bf16").amp
    'bf16'
"""

from __future__ import annotations

import dataclasses

from slimtorch.core.config import Config, check_bool, check_choice, check_int, check_range

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "onecycle", "constant")
AMP_MODES = ("off", "auto", "bf16", "fp16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig(Config):
    """How to train: optimiser, schedule, precision, checkpoints and logging.

    Attributes:
        epochs: Passes over the training loader (>= 1).
        optimizer: ``"sgd"`` or ``"adamw"``.
        lr: Peak learning rate (> 0).
        momentum: SGD momentum in [0, 1) (ignored by AdamW).
        nesterov: Nesterov momentum for SGD (needs ``momentum > 0``).
        weight_decay: Decoupled (AdamW) or L2 (SGD) weight decay (>= 0).
        decay_norm_and_bias: Apply weight decay to norm-layer weights and biases too. Off by
            default: decaying them rarely helps and often hurts.
        schedule: ``"cosine"`` (linear warm-up then cosine to 0), ``"onecycle"`` (Smith &
            Topin 2017, arXiv:1708.07120) or ``"constant"`` (linear warm-up then flat); stepped
            once per iteration.
        warmup_epochs: Linear warm-up length in epochs (may be fractional; >= 0, < epochs).
        label_smoothing: Label smoothing of the default cross-entropy loss, in [0, 1).
        grad_clip_norm: Clip the global gradient L2 norm to this value; ``None`` = no clipping.
        amp: Mixed precision: ``"off"``, ``"auto"`` (bf16 on CUDA/ROCm that supports it, else
            fp16 with a gradient scaler; off on CPU), ``"bf16"`` (forced, CPU included) or
            ``"fp16"`` (with a gradient scaler).
        channels_last: Convert the model and 4-D inputs to channels-last memory format.
        seed: Seed of torch, numpy and ``random`` at the start of :meth:`Trainer.fit`.
        deterministic: Ask torch for deterministic algorithms (slower on GPU).
        checkpoint_every_steps: Also checkpoint every this many optimiser steps (0 = only at
            epoch ends). Needs ``out_dir`` on the trainer.
        eval_every_epochs: Validate every this many epochs and after the last one (0 = never).
        log_every_steps: Period of the plain progress lines written when stderr is not a TTY.
        progress: Add a :class:`~slimtorch.train.ProgressBar` unless one is given.
        sync_batchnorm: Convert BatchNorm layers to ``nn.SyncBatchNorm`` under multi-GPU DDP.
    """

    epochs: int = 10
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    decay_norm_and_bias: bool = False
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    grad_clip_norm: float | None = None
    amp: str = "auto"
    channels_last: bool = False
    seed: int = 0
    deterministic: bool = False
    checkpoint_every_steps: int = 0
    eval_every_epochs: int = 1
    log_every_steps: int = 50
    progress: bool = True
    sync_batchnorm: bool = False

    def __post_init__(self) -> None:
        check_int(self, "epochs", self.epochs, low=1)
        check_choice(self, "optimizer", self.optimizer, OPTIMIZERS)
        check_range(self, "lr", self.lr, low=0.0, low_inclusive=False)
        check_range(self, "momentum", self.momentum, low=0.0, high=1.0, high_inclusive=False)
        check_bool(self, "nesterov", self.nesterov)
        if self.nesterov and self.momentum == 0.0:
            raise ValueError(
                "TrainConfig.nesterov=True needs momentum > 0, got momentum=0.0; "
                "set a momentum such as 0.9 or turn nesterov off"
            )
        check_range(self, "weight_decay", self.weight_decay, low=0.0)
        check_bool(self, "decay_norm_and_bias", self.decay_norm_and_bias)
        check_choice(self, "schedule", self.schedule, SCHEDULES)
        check_range(
            self,
            "warmup_epochs",
            self.warmup_epochs,
            low=0.0,
            high=self.epochs,
            high_inclusive=False,
        )
        check_range(
            self, "label_smoothing", self.label_smoothing, low=0.0, high=1.0, high_inclusive=False
        )
        if self.grad_clip_norm is not None:
            check_range(self, "grad_clip_norm", self.grad_clip_norm, low=0.0, low_inclusive=False)
        check_choice(self, "amp", self.amp, AMP_MODES)
        check_bool(self, "channels_last", self.channels_last)
        check_int(self, "seed", self.seed, low=0, high=2**64 - 1)  # torch generators' range
        check_bool(self, "deterministic", self.deterministic)
        check_int(self, "checkpoint_every_steps", self.checkpoint_every_steps, low=0)
        check_int(self, "eval_every_epochs", self.eval_every_epochs, low=0)
        check_int(self, "log_every_steps", self.log_every_steps, low=1)
        check_bool(self, "progress", self.progress)
        check_bool(self, "sync_batchnorm", self.sync_batchnorm)
