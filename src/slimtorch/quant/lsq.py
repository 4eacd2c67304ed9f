"""Learned step size quantization (LSQ): fake quantization with trainable step sizes.

LSQ (Esser, McKinstry, Bablani, Appuswamy & Modha 2020, "Learned Step Size Quantization",
arXiv:1902.08153) quantizes a tensor ``v`` with a step ``s`` as

    v_q = round(clamp(v / s, -Q_N, Q_P)) * s

and learns ``s`` by gradient descent. The rounding passes gradients straight through (the
straight-through estimator, STE); the step's gradient is scaled by ``g = 1 / sqrt(N * Q_P)``
(``N``: elements the step covers per sample) so that steps and weights learn at similar relative
rates. Steps are initialised to ``2 * mean(|v|) / sqrt(Q_P)``: per output channel for weights
(the paper learns one step per layer; a step per channel follows its gradient-scale argument
with ``N`` the channel's fan-in, and tracks channels of very different ranges)
(``Q_N = 2^(b-1)``, ``Q_P = 2^(b-1) - 1``), per tensor for activations from the first batch seen.
Activations that are never negative on that batch (inputs after a ReLU) get the unsigned range
``[0, 2^b - 1]``, others the signed one.

:class:`LSQConv2d` and :class:`LSQLinear` subclass the float layers, so parameter names and
``isinstance`` checks stay as they were; their quantizers are the submodules ``weight_quant``
and ``input_quant``.

Example:
    >>> conv = LSQConv2d.from_float(nn.Conv2d(3, 8, 3), weight_bits=4, act_bits=8)
    >>> y = conv(torch.rand(2, 3, 8, 8))  # first call initialises the activation step
    >>> conv.weight_quant.step.shape, bool(conv.input_quant.signed)
    (torch.Size([8]), False)
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.core.errors import SlimtorchError

WEIGHT_INITS = ("lsq", "minmax")


class CalibrationError(SlimtorchError):
    """Calibration or initialisation data gave unusable statistics (NaN/Inf, empty)."""


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` in the forward pass; its gradient multiplied by ``scale`` in the backward pass.

    Example:
        >>> s = torch.tensor(2.0, requires_grad=True)
        >>> grad_scale(s, 0.5).backward(); s.grad.item()
        0.5
    """
    y = x * scale
    return (x - y).detach() + y


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity gradient backward (straight-through estimator).

    Example:
        >>> x = torch.tensor([0.4, 1.6], requires_grad=True)
        >>> round_ste(x).sum().backward(); x.grad.tolist()
        [1.0, 1.0]
    """
    return (x.round() - x).detach() + x


def lsq_fake_quantize(
    x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int, g: float
) -> torch.Tensor:
    """LSQ fake quantization ``round(clamp(x / s, qmin, qmax)) * s`` with STE and scaled step grad.

    Args:
        x: The tensor.
        step: Step size, broadcastable to ``x`` (a scalar or ``(C, 1, ...)`` per channel).
        qmin: Lowest integer level (``-2^(b-1)`` signed, ``0`` unsigned).
        qmax: Highest integer level.
        g: Gradient scale of the step, ``1 / sqrt(N * qmax)``.

    Example:
        >>> lsq_fake_quantize(torch.tensor([0.26, 9.0]), torch.tensor(0.5), -8, 7, 1.0).tolist()
        [0.5, 3.5]
    """
    if x.dtype in (torch.float16, torch.bfloat16):
        # under AMP: in half precision x / s rounds to other levels and the step's gradient
        # (a sum over the whole tensor) loses its sign or overflows; compute in float32
        return lsq_fake_quantize(x.float(), step.float(), qmin, qmax, g).to(x.dtype)
    s = grad_scale(step, g)
    return round_ste(torch.clamp(x / s, qmin, qmax)) * s


def signed_range(bits: int) -> tuple[int, int]:
    """``(-2^(b-1), 2^(b-1) - 1)``."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def unsigned_range(bits: int) -> tuple[int, int]:
    """``(0, 2^b - 1)``."""
    return 0, 2**bits - 1


def _check_bits(bits: int, what: str) -> None:
    if isinstance(bits, bool) or bits not in (4, 8):
        raise ValueError(f"{what} must be 4 or 8, got {bits!r}")


def step_scale(step: torch.Tensor) -> torch.Tensor:
    """The quantization step a learned ``step`` parameter stands for: ``|step|``, at least 1e-8.

    SGD with momentum can carry a step size through zero. Clamping it at a small positive value
    would pass no gradient once it is below: the channel's weights would stay quantized to zero
    for the rest of training (seen in a 4-bit QAT of resnet20: one channel of the first block's
    first convolution went negative and stayed). Through ``|step|`` the gradient keeps flowing
    and a step that crossed zero grows back like any other.

    Example:
        >>> s = torch.tensor([0.02, -0.01, 0.0], requires_grad=True)
        >>> step_scale(s).tolist()
        [0.019999999552965164, 0.009999999776482582, 9.99999993922529e-09]
        >>> step_scale(s).sum().backward(); s.grad.tolist()  # sign(s): still a gradient at -0.01
        [1.0, -1.0, 0.0]
    """
    return step.abs().clamp_min(1e-8)


class LSQWeightQuantizer(nn.Module):
    """Per-output-channel signed LSQ quantizer of a weight (``step``: ``(C_out,)``).

    Args:
        weight: The weight it will quantize (used for the initial step only).
        bits: 4 or 8.
        init: ``"lsq"`` (``2 mean|w| / sqrt(Q_P)``, the paper's initialisation, here per
            output channel where the paper has one step per layer) or
            ``"minmax"`` (``max|w| / Q_P``: no clipping at the start, the usual post-training
            choice; often a better start when fine-tuning a trained model at 8 bits).
    """

    def __init__(self, weight: torch.Tensor, bits: int = 8, init: str = "lsq") -> None:
        super().__init__()
        _check_bits(bits, "weight_bits")
        if init not in WEIGHT_INITS:
            raise ValueError(f"weight init must be one of {WEIGHT_INITS}, got {init!r}")
        self.bits = bits
        self.qmin, self.qmax = signed_range(bits)
        w = weight.detach().float().reshape(weight.shape[0], -1)  # (C_out, fan_in)
        if init == "lsq":
            step = 2.0 * w.abs().mean(dim=1) / math.sqrt(self.qmax)
        else:
            step = w.abs().amax(dim=1) / self.qmax
        step = torch.where(step > 0, step, torch.full_like(step, 1e-8))  # all-zero channels
        self.step = nn.Parameter(step.to(weight.device))
        self.numel_per_channel = int(w.shape[1])

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        g = 1.0 / math.sqrt(self.numel_per_channel * self.qmax)
        shape = (-1,) + (1,) * (weight.ndim - 1)
        step = self.scale().reshape(shape)  # (C_out, 1, ...)
        return lsq_fake_quantize(weight, step.to(weight.dtype), self.qmin, self.qmax, g)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_channel={self.step.numel()}"

    def scale(self) -> torch.Tensor:
        """The step the quantizer uses: ``|step|`` (at least 1e-8), see :func:`step_scale`."""
        return step_scale(self.step)


class LSQActQuantizer(nn.Module):
    """Per-tensor LSQ quantizer of a layer input, initialised from the first batch it sees.

    Args:
        bits: 4 or 8.
        signed: ``True``/``False`` to force the range; ``None`` decides on the first batch
            (unsigned when that batch has no negative value).

    Buffers ``initialized`` and ``signed`` are saved with the model, so a trained quantizer
    loads back as it was.
    """

    def __init__(self, bits: int = 8, signed: bool | None = None) -> None:
        super().__init__()
        _check_bits(bits, "act_bits")
        self.bits = bits
        self.auto_sign = signed is None
        self.step = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("signed", torch.tensor(bool(signed)))

    @property
    def qrange(self) -> tuple[int, int]:
        """``(qmin, qmax)`` of the current sign mode."""
        return signed_range(self.bits) if bool(self.signed) else unsigned_range(self.bits)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set the sign mode (when automatic) and ``step = 2 mean|x| / sqrt(Q_P)`` from ``x``."""
        xf = x.detach().float()
        if xf.numel() == 0:
            raise CalibrationError(
                "the activation quantizer got an empty tensor on its first call; feed a "
                "non-empty batch to initialise its step size"
            )
        if not bool(torch.isfinite(xf).all()):
            raise CalibrationError(
                "NaN/Inf activations reached an activation quantizer on its first batch; the "
                "float model or the batch is broken: check the inputs and weights"
            )
        if self.auto_sign:
            self.signed.fill_(bool(xf.min() < 0))  # type: ignore[operator]
        qmax = self.qrange[1]
        step = 2.0 * xf.abs().mean() / math.sqrt(qmax)
        if not step > 0:
            step = torch.tensor(1e-3)  # an all-zero batch: any small step, training moves it
        self.step.copy_(step)
        self.initialized.fill_(True)  # type: ignore[operator]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            self.initialize(x)
        qmin, qmax = self.qrange
        g = 1.0 / math.sqrt(max(x[0].numel(), 1) * qmax) if x.ndim > 0 else 1.0
        return lsq_fake_quantize(x, self.scale(), qmin, qmax, g)

    def scale(self) -> torch.Tensor:
        """The step the quantizer uses: ``|step|`` (at least 1e-8), see :func:`step_scale`."""
        return step_scale(self.step)

    def extra_repr(self) -> str:
        mode = "auto" if self.auto_sign else ("signed" if bool(self.signed) else "unsigned")
        return f"bits={self.bits}, sign={mode}"


class _LSQMixin:
    weight_quant: LSQWeightQuantizer
    input_quant: LSQActQuantizer | None

    def _attach(self, weight_bits: int, act_bits: int | None, weight_init: str) -> None:
        weight = self.weight  # type: ignore[attr-defined]
        self.weight_quant = LSQWeightQuantizer(weight, weight_bits, weight_init)
        self.input_quant = None if act_bits is None else LSQActQuantizer(act_bits).to(weight.device)

    def _quant_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quant is None else self.input_quant(x)

    def lsq_spec(self) -> dict[str, Any]:
        """``{"weight_bits": b, "act_bits": b or None}``."""
        return {
            "weight_bits": self.weight_quant.bits,
            "act_bits": None if self.input_quant is None else self.input_quant.bits,
        }


def _conv_like(conv: nn.Conv2d, cls: type[nn.Conv2d]) -> nn.Conv2d:
    """A ``cls`` with ``conv``'s hyper-parameters sharing its weight and bias parameters."""
    out = cls(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device="meta",
    )
    out.weight = conv.weight
    out.bias = conv.bias
    _carry_buffers(conv, out)
    return out.train(conv.training)


def _linear_like(linear: nn.Linear, cls: type[nn.Linear]) -> nn.Linear:
    """A ``cls`` with ``linear``'s shape sharing its weight and bias parameters."""
    out = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    out.weight = linear.weight
    out.bias = linear.bias
    _carry_buffers(linear, out)
    return out.train(linear.training)


def _carry_buffers(src: nn.Module, dst: nn.Module) -> None:
    """Give ``dst`` the buffers ``src`` holds itself (not its children's): a pruning or
    sparse-training mask (``weight_mask``) must outlive the swap, or the layer turns dense."""
    for name, buf in src._buffers.items():
        if buf is not None and name not in dst._buffers:
            dst.register_buffer(name, buf, persistent=name not in src._non_persistent_buffers_set)


class LSQConv2d(_LSQMixin, nn.Conv2d):
    """``nn.Conv2d`` with LSQ fake quantization of its weight and (optionally) its input."""

    @classmethod
    def from_float(
        cls,
        conv: nn.Conv2d,
        *,
        weight_bits: int = 8,
        act_bits: int | None = 8,
        weight_init: str = "lsq",
    ) -> LSQConv2d:
        """Wrap ``conv``; the new layer shares its weight and bias parameters.

        Example:
            >>> LSQConv2d.from_float(nn.Conv2d(1, 2, 3), weight_bits=8).weight_quant.bits
            8
        """
        if type(conv) is not nn.Conv2d:
            raise TypeError(f"expected an nn.Conv2d, got {type(conv).__name__}")
        new = _conv_like(conv, cls)
        assert isinstance(new, LSQConv2d)
        new._attach(weight_bits, act_bits, weight_init)
        return new

    def to_float(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` sharing this layer's weight and bias (quantizers dropped)."""
        return _conv_like(self, nn.Conv2d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._quant_input(x), self.weight_quant(self.weight), self.bias)


class LSQLinear(_LSQMixin, nn.Linear):
    """``nn.Linear`` with LSQ fake quantization of its weight and (optionally) its input."""

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        *,
        weight_bits: int = 8,
        act_bits: int | None = 8,
        weight_init: str = "lsq",
    ) -> LSQLinear:
        """Wrap ``linear``; the new layer shares its weight and bias parameters.

        Example:
            >>> LSQLinear.from_float(nn.Linear(4, 2), act_bits=None).input_quant is None
            True
        """
        if type(linear) is not nn.Linear:
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        new = _linear_like(linear, cls)
        assert isinstance(new, LSQLinear)
        new._attach(weight_bits, act_bits, weight_init)
        return new

    def to_float(self) -> nn.Linear:
        """A plain ``nn.Linear`` sharing this layer's weight and bias (quantizers dropped)."""
        return _linear_like(self, nn.Linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._quant_input(x), self.weight_quant(self.weight), self.bias)


LSQ_LAYERS: tuple[type[nn.Module], ...] = (LSQConv2d, LSQLinear)
