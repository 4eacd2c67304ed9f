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

import torch
import torch.nn.functional as F


def _no_autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device_type=device.type, enabled=False)


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
        ValueError: The shapes differ, are not ``(N, C)``, or ``temperature <= 0``.

    Example:
        >>> s = torch.zeros(1, 2)
        >>> t = torch.tensor([[1.0986123, 0.0]])  # ln 3: p = (0.75, 0.25)
        >>> round(kd_loss(s, t, temperature=1.0).item(), 4)  # .75 ln 1.5 + .25 ln .5
        0.1308
    """
    if not isinstance(temperature, int | float) or isinstance(temperature, bool):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
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
        ValueError: The shapes differ.

    Example:
        >>> hint_loss(torch.ones(2, 3), torch.zeros(2, 3)).item()
        1.0
    """
    if student_feat.shape != teacher_feat.shape:
        raise ValueError(
            f"hint features differ in shape: student {tuple(student_feat.shape)}, teacher "
            f"{tuple(teacher_feat.shape)}; pick layer pairs whose outputs have the same shape"
        )
    with _no_autocast(student_feat.device):
        return F.mse_loss(student_feat.float(), teacher_feat.detach().float())
