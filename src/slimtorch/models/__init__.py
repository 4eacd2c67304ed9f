"""Model registry and zoo, saving and loading model directories and exported programs.

Example:
    >>> from slimtorch.models import create_model, list_models
    >>> "resnet20" in list_models()
    True
    >>> model = create_model("resnet20", num_classes=10, in_channels=3, input_size=32)
    >>> model(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from slimtorch.models import lenet, mlp, mobilenet, resnet, vgg  # noqa: F401  (registers)
from slimtorch.models.card import ModelCard, read_model_card, update_metrics
from slimtorch.models.exported import load_exported, save_exported
from slimtorch.models.io import load_model, save_model
from slimtorch.models.registry import MODELS, create_model, list_models, register_model
from slimtorch.models.transforms import ARCH_TRANSFORMS, record_transform, replay_transforms

__all__ = [
    "ARCH_TRANSFORMS",
    "MODELS",
    "ModelCard",
    "create_model",
    "list_models",
    "load_exported",
    "load_model",
    "read_model_card",
    "record_transform",
    "register_model",
    "replay_transforms",
    "save_exported",
    "save_model",
    "update_metrics",
]
