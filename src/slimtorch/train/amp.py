"""Mixed-precision plan: which autocast dtype a run uses and whether it needs a gradient scaler.

``"auto"`` picks bfloat16 on CUDA/ROCm GPUs that compute in it natively (NVIDIA Ampere and
later; AMD CDNA and RDNA 3 and later), float16 with a :class:`torch.amp.GradScaler` on the others,
such as the RX 580 and the GTX 1060 (Micikevicius et al. 2017, arXiv:1710.03740),
and full precision on the CPU (bfloat16 matmuls are slow on CPUs without AMX/AVX512-BF16).
``"bf16"`` and ``"fp16"`` force the dtype on any device.

Example:
    >>> plan = resolve_amp("bf16", torch.device("cpu"))
    >>> plan.dtype, plan.use_scaler
    (torch.bfloat16, False)
    >>> model, x = nn.Linear(4, 2), torch.randn(3, 4)
    >>> with plan.autocast(torch.device("cpu")):
    ...     y = model(x)
    >>> y.dtype
    torch.bfloat16
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any

import torch

from slimtorch.core.devices import native_bf16

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AmpPlan:
    """The resolved precision of a run.

    Attributes:
        dtype: Autocast dtype, or ``None`` for full precision.
        use_scaler: Whether losses are scaled (float16 only).
    """

    dtype: torch.dtype | None
    use_scaler: bool

    @property
    def name(self) -> str:
        """``"off"``, ``"bf16"`` or ``"fp16"``."""
        return {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        """An autocast context for ``device`` (a no-op context when precision is full).

        Example:
            >>> with AmpPlan(torch.bfloat16, False).autocast(torch.device("cpu")):
            ...     torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype
            torch.bfloat16
            >>> with AmpPlan(None, False).autocast(torch.device("cpu")):  # full precision
            ...     torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype
            torch.float32
        """
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)

    def make_scaler(self, device: torch.device) -> torch.amp.GradScaler | None:
        """A gradient scaler for ``device`` when ``use_scaler``, else ``None``.

        Example:
            >>> AmpPlan(None, False).make_scaler(torch.device("cpu")) is None
            True
        """
        if not self.use_scaler:
            return None
        return torch.amp.GradScaler(device.type)


def _cuda_bf16(device: torch.device) -> bool:
    """Native bfloat16 on ``device`` (see :func:`slimtorch.core.devices.native_bf16`)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        return native_bf16(index)
    except (RuntimeError, AssertionError):  # pragma: no cover - broken driver set-ups
        return False


def _cuda_bf16_at_all() -> bool:
    try:
        return bool(torch.cuda.is_bf16_supported())
    except (RuntimeError, AssertionError):  # pragma: no cover - broken driver set-ups
        return False


def resolve_amp(amp: str, device: torch.device) -> AmpPlan:
    """Turn the ``amp`` setting of a :class:`TrainConfig` into an :class:`AmpPlan` for ``device``.

    Args:
        amp: ``"off"``, ``"auto"``, ``"bf16"`` or ``"fp16"``.
        device: The training device.

    Returns:
        The plan.

    Example:
        >>> resolve_amp("auto", torch.device("cpu")).name
        'off'
    """
    device = torch.device(device)
    if amp == "off":
        return AmpPlan(None, False)
    if amp == "bf16":
        if device.type == "cuda" and not _cuda_bf16(device):
            if not _cuda_bf16_at_all():
                raise ValueError(
                    f"amp='bf16' was asked for but {device} does not support bfloat16; "
                    "use amp='fp16' or amp='auto' on this GPU"
                )
            logger.warning(
                "amp='bf16': %s has no native bfloat16 arithmetic, so it runs emulated (slow) "
                "or fails in some kernels; amp='auto' picks fp16 with loss scaling here",
                device,
            )
        return AmpPlan(torch.bfloat16, False)
    if amp == "fp16":
        if device.type == "cpu":
            logger.warning("amp='fp16' on the CPU is usually slower than full precision")
        return AmpPlan(torch.float16, True)
    if amp == "auto":
        if device.type == "cuda":
            if _cuda_bf16(device):
                return AmpPlan(torch.bfloat16, False)
            return AmpPlan(torch.float16, True)
        return AmpPlan(None, False)
    raise ValueError(f"amp must be one of 'off', 'auto', 'bf16', 'fp16', got {amp!r}")
