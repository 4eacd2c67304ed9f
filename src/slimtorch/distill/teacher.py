"""Load a saved model directory as a teacher and check that it fits the student's data.

Example:
    >>> import tempfile, pathlib; d = pathlib.Path(tempfile.mkdtemp())
    >>> from slimtorch.models import create_model, save_model
    >>> net = create_model("mlp", num_classes=10, in_channels=1, input_size=8, hidden=(32,))
    >>> _ = save_model(net, d / "run" / "model", input_shape=(1, 8, 8), mean=[0.5], std=[0.5],
    ...                class_names=list("0123456789"))
    >>> teacher = load_teacher(d / "run", input_shape=(1, 8, 8), num_classes=10)  # run/model
    >>> type(teacher).__name__, teacher.training
    ('MLP', False)
"""

from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtorch.models import load_model
from slimtorch.models.card import model_root

logger = logging.getLogger(__name__)


def load_teacher(
    path: str | os.PathLike[str],
    *,
    input_shape: Sequence[int],
    num_classes: int,
    device: str | torch.device = "cpu",
    classes: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    """Load the model directory ``path`` (or a run directory with ``model/``) as a teacher.

    Args:
        path: A directory written by :func:`slimtorch.models.save_model`.
        input_shape: ``(C, H, W)`` of the data the student trains on.
        num_classes: Number of classes of that data.
        device: Where to load the weights.
        classes: The data's class names; when given, the teacher's must be the same, in the
            same order (a teacher of another dataset with as many classes would teach wrong
            labels).
        mean: The per-channel mean the student's inputs are normalised with; with ``std``,
            where it differs from the teacher's own normalisation, a forward pre-hook maps each
            input onto the teacher's (``x * std / std_t + (mean - mean_t) / std_t``), so the
            teacher sees its inputs as in its training.
        std: The per-channel standard deviation that goes with ``mean``.

    Returns:
        The teacher in eval mode.

    Raises:
        TypeError: ``num_classes`` is not an int or ``input_shape`` not a sequence of ints.
        ValueError: ``num_classes`` or a size is < 1, or the teacher's input shape or class
            count differs from the data's (the message names each mismatch).
        ModelLoadError: The directory is missing or corrupt.

    Example:
        >>> import tempfile, pathlib; d = pathlib.Path(tempfile.mkdtemp())
        >>> from slimtorch.models import create_model, save_model
        >>> net = create_model("mlp", num_classes=10, in_channels=1, input_size=8, hidden=(32,))
        >>> _ = save_model(net, d / "mlp", input_shape=(1, 8, 8), mean=[0.5], std=[0.5],
        ...                class_names=list("0123456789"))
        >>> teacher = load_teacher(d / "mlp", input_shape=(1, 8, 8), num_classes=10)
        >>> load_teacher(d / "mlp", input_shape=(1, 8, 8), num_classes=100)
        Traceback (most recent call last):
        ...
        ValueError: teacher ... does not fit the training data: it predicts 10 classes, the data ...
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise TypeError(f"num_classes must be an int, got {num_classes!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes!r}")
    dims = () if isinstance(input_shape, str) else input_shape
    ok = isinstance(dims, Sequence) and len(dims) > 0
    if not ok or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in dims):
        raise TypeError(
            f"input_shape must be a sequence of ints such as (3, 32, 32), got {input_shape!r}"
        )
    if any(d < 1 for d in dims):
        raise ValueError(f"input_shape must hold positive sizes, got {tuple(input_shape)}")
    root = model_root(path)
    model, card = load_model(root, device=device)
    shape = tuple(int(d) for d in dims)
    problems = []
    if tuple(card.input_shape) != shape:
        problems.append(f"it takes inputs of shape {tuple(card.input_shape)}, the data is {shape}")
    with torch.no_grad():
        out = model(torch.zeros(1, *card.input_shape, device=device))
    if out.ndim != 2 or out.shape[1] != num_classes:
        problems.append(f"it predicts {out.shape[-1]} classes, the data has {num_classes}")
    elif classes is not None and card.class_names and tuple(card.class_names) != tuple(classes):
        problems.append(
            f"its classes are {_names(card.class_names)}, the data's are {_names(classes)}"
        )
    if problems:
        raise ValueError(
            f"teacher {root} does not fit the training data: {'; '.join(problems)}; "
            "use a teacher trained on the same dataset"
        )
    if mean is not None and std is not None:
        _renormalise_inputs(model, root, (mean, std), (card.mean, card.std))
    return model


def _names(names: Sequence[str]) -> str:
    text = ", ".join(names)
    return f"({text if len(text) <= 60 else text[:57] + '...'})"


def _renormalise_inputs(
    model: nn.Module,
    root: Path,
    data: tuple[Sequence[float], Sequence[float]],
    own: tuple[Sequence[float], Sequence[float]],
) -> None:
    """Hook ``model`` so that inputs normalised with ``data`` (mean, std) reach it normalised
    with its ``own``; nothing is hooked when the two agree."""
    d_mean, d_std = (torch.tensor(v, dtype=torch.float64).flatten() for v in data)
    t_mean, t_std = (torch.tensor(v, dtype=torch.float64).flatten() for v in own)
    if len({d_mean.numel(), d_std.numel(), t_mean.numel(), t_std.numel()}) != 1:
        raise ValueError(
            f"teacher {root} is normalised over {t_mean.numel()} channel(s), the data over "
            f"{d_mean.numel()}; use a teacher trained on the same dataset"
        )
    if torch.allclose(d_mean, t_mean, rtol=1e-6, atol=0) and torch.allclose(
        d_std, t_std, rtol=1e-6, atol=0
    ):
        return
    scale, shift = d_std / t_std, (d_mean - t_mean) / t_std
    logger.info(
        "teacher %s was trained with mean %s and std %s, the data is normalised with %s and "
        "%s: its inputs are mapped onto its own normalisation",
        root, tuple(own[0]), tuple(own[1]), tuple(data[0]), tuple(data[1]),
    )  # fmt: skip

    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        shape = (1, -1) + (1,) * (x.ndim - 2)
        a = scale.to(x.device, x.dtype).view(shape)
        b = shift.to(x.device, x.dtype).view(shape)
        return (x * a + b, *args[1:])

    model.register_forward_pre_hook(hook)
