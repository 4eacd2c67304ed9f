"""Load a saved model directory as a teacher and check that it fits the student's data.

Example:
    >>> teacher = load_teacher("runs/resnet56", input_shape=(3, 32, 32), num_classes=10)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from slimtorch.models import load_model


def load_teacher(
    path: str | os.PathLike[str],
    *,
    input_shape: Sequence[int],
    num_classes: int,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Load the model directory ``path`` (or a run directory with ``model/``) as a teacher.

    Args:
        path: A directory written by :func:`slimtorch.models.save_model`.
        input_shape: ``(C, H, W)`` of the data the student trains on.
        num_classes: Number of classes of that data.
        device: Where to load the weights.

    Returns:
        The teacher in eval mode.

    Raises:
        ValueError: Its input shape or class count differs from the data's (the message
            names each mismatch).
        ModelLoadError: The directory is missing or corrupt.

    Example:
        >>> teacher = load_teacher("runs/mlp", input_shape=(1, 8, 8), num_classes=10)
    """
    root = Path(path)
    if not (root / "config.json").is_file() and (root / "model" / "config.json").is_file():
        root = root / "model"
    model, card = load_model(root, device=device)
    shape = tuple(int(d) for d in input_shape)
    problems = []
    if tuple(card.input_shape) != shape:
        problems.append(f"it takes inputs of shape {tuple(card.input_shape)}, the data is {shape}")
    with torch.no_grad():
        out = model(torch.zeros(1, *card.input_shape, device=device))
    if out.ndim != 2 or out.shape[1] != num_classes:
        problems.append(f"it predicts {out.shape[-1]} classes, the data has {num_classes}")
    if problems:
        raise ValueError(
            f"teacher {root} does not fit the training data: {'; '.join(problems)}; "
            "use a teacher trained on the same dataset"
        )
    return model
