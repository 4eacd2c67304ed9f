"""Knowledge distillation: losses, config and the Trainer callback.

Example:
    >>> from slimtorch.distill import DistillConfig, DistillationCallback
    >>> from slimtorch.train import Trainer, TrainConfig
    >>> teacher = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 4))  # untrained here
    >>> student = nn.Linear(8, 4)
    >>> train_loader = [(torch.randn(16, 8), torch.randint(0, 4, (16,))) for _ in range(4)]
    >>> cb = DistillationCallback(teacher, DistillConfig(temperature=4.0, alpha=0.9))
    >>> cfg = TrainConfig(epochs=5, progress=False)
    >>> Trainer(student, cfg, callbacks=[cb]).fit(train_loader).epoch
    [1, 2, 3, 4, 5]
    >>> any(p.requires_grad for p in teacher.parameters())  # frozen, never trained
    False
"""

from __future__ import annotations

from slimtorch.distill.callback import DistillationCallback
from slimtorch.distill.config import DistillConfig
from slimtorch.distill.losses import hint_loss, kd_loss
from slimtorch.distill.teacher import load_teacher

__all__ = ["DistillConfig", "DistillationCallback", "hint_loss", "kd_loss", "load_teacher"]
