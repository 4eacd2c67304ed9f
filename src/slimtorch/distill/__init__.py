"""Knowledge distillation: losses, config and the Trainer callback.

Example:
    >>> from slimtorch.distill import DistillConfig, DistillationCallback
    >>> cb = DistillationCallback(teacher, DistillConfig(temperature=4.0, alpha=0.9))
    >>> Trainer(student, TrainConfig(epochs=5), callbacks=[cb]).fit(train_loader)
"""

from __future__ import annotations

from slimtorch.distill.callback import DistillationCallback
from slimtorch.distill.config import DistillConfig
from slimtorch.distill.losses import hint_loss, kd_loss
from slimtorch.distill.teacher import load_teacher

__all__ = ["DistillConfig", "DistillationCallback", "hint_loss", "kd_loss", "load_teacher"]
