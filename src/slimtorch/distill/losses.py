"""Distillation losses: softened-logit KL (Hinton et al.) and feature hints (FitNets).

Both losses are computed in float32 even when called inside an autocast region: the softmax of
logits divided by a temperature loses most of its precision in float16/bfloat16, and the KL
divergence of two nearly equal distributions is a small difference of large numbers.

Example:
    >>> s, t = torch.randn(8, 10), torch.randn(8, 10)
    >>> kd_loss(s, t, temperature=4.0).shape
    torch.Size([])
    >>> hint_loss(torch.randn(8, 16, 4, 4), torch.randn(8, 16, 4, 4)).ndim
    0
"""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import Any

import torch
import torch.nn.functional as F


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if not torch.amp.is_autocast_available(device.type):  # e.g. meta: nothing to turn off
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def _check_pair(student: Any, teacher: Any, what: str) -> None:
    """Raise unless ``student`` and ``teacher`` are floating-point tensors on one device."""
    for name, t in (("student", student), ("teacher", teacher)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} {what} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            hint = (
                "; pass raw logits, not class indices or one-hot labels" if what == "logits" else ""
            )
            raise TypeError(f"{name} {what} must be floating point, got {t.dtype}{hint}")
    if student.device != teacher.device:
        raise ValueError(
            f"student {what} are on {student.device}, teacher {what} on {teacher.device}; "
            "move both to one device"
        )


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float
) -> torch.Tensor:
    """Knowledge-distillation loss ``T^2 * KL(softmax(t/T) || softmax(s/T))``, batch mean.

    Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network",
    arXiv:1503.02531. The gradient of the KL term with respect to a student logit is
    ``(q_i - p_i) / T`` (``q``, ``p`` the student's and teacher's softened probabilities), and
    for ``T`` large compared with the logits ``q_i - p_i`` itself shrinks like ``1/T``: the
    gradient falls off as ``1/T^2``. Multiplying by ``T^2`` keeps the soft term's gradient
    scale independent of the temperature, so ``alpha`` weighs it against the hard loss the
    same way whatever ``T`` is.

    Args:
        student_logits: ``(N, C)`` logits of the student (gradients flow into these).
        teacher_logits: ``(N, C)`` logits of the teacher (treated as constants).
        temperature: Softening temperature ``T > 0``.

    Returns:
        A float32 scalar: the KL divergence summed over classes, averaged over the batch,
        times ``T^2``.

    Raises:
        TypeError: The logits are not floating-point tensors, or ``temperature`` is not a
            real number.
        ValueError: The shapes differ, are not ``(N, C)`` or are empty, the logits are on
            different devices, or ``temperature`` is not finite and > 0.

    Example:
        >>> s = torch.zeros(1, 2)
        >>> t = torch.tensor([[1.0986123, 0.0]])  # ln 3: p = (0.75, 0.25)
        >>> round(kd_loss(s, t, temperature=1.0).item(), 4)  # .75 ln 1.5 + .25 ln .5
        0.1308
    """
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not math.isfinite(temperature):  # an infinite or NaN temperature makes the loss NaN
        raise ValueError(f"temperature must be finite, got {temperature!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    temperature = float(temperature)  # numpy scalars too
    _check_pair(student_logits, teacher_logits, "logits")
    if student_logits.ndim != 2:
        raise ValueError(
            f"kd_loss expects (N, C) logits, got student logits of shape "
            f"{tuple(student_logits.shape)}; flatten the extra dimensions into N first"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape; the teacher must predict the same "
            "classes on the same batch"
        )
    if student_logits.numel() == 0:  # batchmean of nothing is NaN
        raise ValueError(
            f"kd_loss got empty logits of shape {tuple(student_logits.shape)}; it needs at "
            "least one sample and one class"
        )
    with _no_autocast(student_logits.device):
        log_q = F.log_softmax(student_logits.float() / temperature, dim=1)
        log_p = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
        # sum_i p_i (log p_i - log q_i), summed over classes, mean over the batch
        kl = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    return kl * (temperature * temperature)


def hint_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """Mean squared error between a student feature map and a teacher's (a FitNets hint).

    Romero et al. 2014, "FitNets: Hints for Thin Deep Nets", arXiv:1412.6550. The features
    must already have the same shape (FitNets adds a trained regressor when they do not; here
    the hint layers are chosen so that shapes match).

    Args:
        student_feat: Student activations, any shape (gradients flow into these).
        teacher_feat: Teacher activations of the same shape (treated as constants).

    Returns:
        A float32 scalar.

    Raises:
        TypeError: The features are not floating-point tensors.
        ValueError: The shapes or devices differ, or the features are empty.

    Example:
        >>> hint_loss(torch.ones(2, 3), torch.zeros(2, 3)).item()
        1.0
    """
    _check_pair(student_feat, teacher_feat, "features")
    if student_feat.shape != teacher_feat.shape:
        raise ValueError(
            f"hint features differ in shape: student {tuple(student_feat.shape)}, teacher "
            f"{tuple(teacher_feat.shape)}; pick layer pairs whose outputs have the same shape"
        )
    if student_feat.numel() == 0:  # the mean of nothing is NaN
        raise ValueError(f"hint features are empty (shape {tuple(student_feat.shape)})")
    with _no_autocast(student_feat.device):
        return F.mse_loss(student_feat.float(), teacher_feat.detach().float())
