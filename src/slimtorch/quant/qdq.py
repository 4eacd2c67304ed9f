"""The one int8 representation of slimtorch: Q/DQ modules holding int8 weights.

:class:`QDQConv2d` and :class:`QDQLinear` store their weights as int8 tensors (per output
channel, symmetric, zero point 0; 4-bit weights are int8 tensors with values in ``[-8, 7]``)
with float32 scales, and optional static input quantization parameters. Their forward is
written with the ``quantized_decomposed`` operators of PyTorch 2 export quantization::

    x -> quantize_per_tensor -> dequantize_per_tensor -+
    w_int8 -> dequantize_per_channel ------------------+-> conv2d / linear (+ bias)

This is the exact pattern that ``convert_pt2e`` emits, so the same module runs three ways:

- eagerly, as a reference (dequantize, then float maths: no speed-up, smaller weights);
- through ``torch.compile`` with inductor freezing on x86 (:func:`slimtorch.quant.runtime.
  compile_int8_x86`), where torchao's x86 inductor passes rewrite the pattern into oneDNN
  ``onednn.qconv_pointwise`` / ``onednn.qlinear_pointwise`` int8 kernels (checked in the tests
  by reading the generated code);
- exported to ONNX with the dynamo exporter, where the operators become
  ``QuantizeLinear``/``DequantizeLinear`` pairs that ONNX Runtime fuses into ``QLinearConv`` /
  ``QLinearMatMul`` int8 kernels.

Without input parameters (``input_scale=None``) a module is weight-only: int8 storage, float
compute. :func:`to_qdq_` swaps named layers for these modules and records the architecture
transform ``"quant.qdq"`` so ``save_model``/``load_model`` round-trip the int8 model (int8
weights and scales in safetensors, input parameters in ``config.json``; no calibration data).

Example:
    >>> net = nn.Sequential(nn.Linear(16, 8))
    >>> scale = quantize_weight(net[0].weight)[1]
    >>> report = to_qdq_(net, {"0": LayerQParams(weight_scale=scale, input_scale=0.02)})
    >>> type(net[0]).__name__, net[0].weight_int8.dtype
    ('QDQLinear', torch.int8)
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import torch
import torch.ao.quantization.fx._decomposed
from torch import nn
from torch.nn import functional as F

from slimtorch.core.errors import ModelLoadError
from slimtorch.quant.int4 import pack_int4, unpack_int4
from slimtorch.quant.qfunc import fake_quantize, quantize_weight, weight_range

logger = logging.getLogger(__name__)

_QD = torch.ops.quantized_decomposed
PACKED_KEY = "weight_int4_packed"
"""State-dict key of a 4-bit layer's weights, packed two per byte."""
_INPUT_RANGES = {"uint8": (0, 255, torch.uint8), "int8": (-128, 127, torch.int8)}


@dataclasses.dataclass
class LayerQParams:
    """Quantization parameters of one Conv2d/Linear layer, as :func:`to_qdq_` takes them.

    Attributes:
        weight_scale: ``(C_out,)`` float32 per-output-channel weight scales (zero point 0).
        weight_bits: 8 or 4.
        input_scale: Static input scale; ``None`` makes the layer weight-only.
        input_zero_point: Input zero point (0 for ``"int8"``).
        input_dtype: ``"uint8"`` (affine, ``[0, 255]``) or ``"int8"`` (symmetric,
            ``[-128, 127]``, zero point 0).
        input_dynamic: Quantize the input with a scale computed from each batch (dynamic
            quantization); ``input_scale`` must then be ``None``.
        output_scale: Static output scale (same dtype as the input), or ``None`` for a float
            output. Set where the output feeds an op that should run in int8 too (a residual
            add): ONNX Runtime then fuses ``QLinearConv`` and ``QLinearAdd``.
        output_zero_point: Output zero point.
    """

    weight_scale: torch.Tensor
    weight_bits: int = 8
    input_scale: float | None = None
    input_zero_point: int = 0
    input_dtype: str = "uint8"

    def check(self, name: str, out_channels: int) -> None:
        """Raise ``ValueError`` naming the layer unless the parameters are consistent."""
        where = f"LayerQParams of {name!r}"
        s = self.weight_scale
        if not isinstance(s, torch.Tensor) or s.numel() != out_channels or s.ndim > 1:
            got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"{where}: weight_scale must have shape ({out_channels},), got {got}")
        if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
            raise ValueError(f"{where}: weight_scale must be finite and > 0 everywhere")
        weight_range(self.weight_bits)
        if self.input_dtype not in _INPUT_RANGES:
            raise ValueError(
                f"{where}: input_dtype must be 'uint8' or 'int8', got {self.input_dtype!r}"
            )
        if self.input_dynamic and self.input_scale is not None:
            raise ValueError(f"{where}: a dynamic layer takes input_scale=None")
        qmin, qmax, _ = _INPUT_RANGES[self.input_dtype]
        for label, sc, zp in (
            ("input", self.input_scale, self.input_zero_point),
            ("output", self.output_scale, self.output_zero_point),
        ):
            if sc is None:
                continue
            if isinstance(sc, bool) or not isinstance(sc, int | float) or not 0 < sc < math.inf:
                raise ValueError(f"{where}: {label}_scale must be a finite number > 0, got {sc!r}")
            if isinstance(zp, bool) or not isinstance(zp, int) or not qmin <= zp <= qmax:
                raise ValueError(
                    f"{where}: {label}_zero_point must be an int in [{qmin}, {qmax}], got {zp!r}"
                )
            if self.input_dtype == "int8" and zp != 0:
                raise ValueError(f"{where}: int8 (symmetric) needs {label}_zero_point 0, got {zp}")

    input_dynamic: bool = False
    output_scale: float | None = None
    output_zero_point: int = 0


class _QDQLayer(nn.Module):
    """Shared storage and quantize/dequantize steps of :class:`QDQConv2d` and :class:`QDQLinear`."""

    weight_buffers = ("weight_int8",)  # counted as parameters by count_params
    weight_int8: torch.Tensor
    weight_scale: torch.Tensor
    weight_zero_point: torch.Tensor

    def _init_qdq(
        self,
        weight_shape: tuple[int, ...],
        bias: bool,
        weight_bits: int,
        input_scale: float | None,
        input_zero_point: int,
        input_dtype: str,
        input_dynamic: bool,
        output_scale: float | None,
        output_zero_point: int,
        device: torch.device | str | None,
    ) -> None:
        c_out = weight_shape[0]
        self.weight_bits = weight_bits
        self.weight_qmin, self.weight_qmax = weight_range(weight_bits)
        if input_dtype not in _INPUT_RANGES:
            raise ValueError(f"input_dtype must be 'uint8' or 'int8', got {input_dtype!r}")
        if input_dynamic and input_scale is not None:
            raise ValueError(
                "a dynamic layer computes its input scale per call; pass input_scale=None"
            )
        for what, scale in (("input_scale", input_scale), ("output_scale", output_scale)):
            if scale is not None and not 0 < float(scale) < math.inf:
                raise ValueError(f"{what} must be finite and > 0, got {scale!r}")
        self.input_scale = None if input_scale is None else float(input_scale)
        self.input_zero_point = int(input_zero_point)
        self.input_dtype = input_dtype
        self.input_dynamic = bool(input_dynamic)
        self.output_scale = None if output_scale is None else float(output_scale)
        self.output_zero_point = int(output_zero_point)
        self.register_buffer(
            "weight_int8", torch.zeros(weight_shape, dtype=torch.int8, device=device)
        )
        # float32 whatever the default dtype: the int8 path computes in float32
        self.register_buffer("weight_scale", torch.ones(c_out, dtype=torch.float32, device=device))
        # zero points of symmetric weights: always 0, rebuilt on load, never saved
        self.register_buffer(
            "weight_zero_point",
            torch.zeros(c_out, dtype=torch.int64, device=device),
            persistent=False,
        )
        self.bias: nn.Parameter | None = (
            nn.Parameter(torch.zeros(c_out, dtype=torch.float32, device=device)) if bias else None
        )

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight_bits == 4:  # saved two per byte (slimtorch.quant.int4)
            q = destination.pop(prefix + "weight_int8")
            destination[prefix + PACKED_KEY] = pack_int4(q.detach())

    def _load_from_state_dict(
        self,
        state_dict: Any,
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + PACKED_KEY
        if self.weight_bits == 4 and key in state_dict:
            try:
                q = unpack_int4(state_dict[key], self.weight_int8.shape)
            except ValueError as exc:
                error_msgs.append(f"{key}: {exc}")
            else:
                state_dict = {**state_dict, prefix + "weight_int8": q}
                del state_dict[key]
        scale = state_dict.get(prefix + "weight_scale")
        if isinstance(scale, torch.Tensor) and not bool(
            (torch.isfinite(scale) & (scale > 0)).all()
        ):
            raise ModelLoadError(
                f"{prefix}weight_scale holds NaN/Inf or non-positive values; the saved int8 "
                "weights cannot be dequantized (a corrupt file): re-save the model"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight ``weight_int8 * weight_scale`` (per output channel)."""
        return _QD.dequantize_per_channel(
            self.weight_int8,
            self.weight_scale,
            self.weight_zero_point,
            0,
            self.weight_qmin,
            self.weight_qmax,
            torch.int8,
        )

    @property
    def roofline_kernel(self) -> str | None:
        """How a runtime with int8 kernels runs this layer, for the roofline estimate.

        ``"int8"`` when its input is quantized as well (one int8 GEMM or convolution, the Q/DQ
        steps fused into it) with a statically quantized output, ``"int8>fp32"`` with a float
        output, and ``"int8-dynamic>fp32"`` when the input's range is measured on each call (a
        quantize pass over the float input first); None when only the weights are quantized
        (dequantized, then a float kernel).
        """
        if self.weight_bits != 8 or not (self.input_dynamic or self.input_scale is not None):
            return None
        kind = "int8-dynamic" if self.input_dynamic else "int8"
        return kind if self.output_scale is not None else f"{kind}>fp32"

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` with the static (or per-call dynamic) input parameters."""
        qmin, qmax, dtype = _INPUT_RANGES[self.input_dtype]
        if self.input_dynamic:
            lo, hi = x.detach().amin().clamp(max=0), x.detach().amax().clamp(min=0)
            if self.input_dtype == "int8":
                scale = (torch.maximum(-lo, hi) / qmax).clamp(min=1e-8)
                zp = torch.zeros((), dtype=torch.int64, device=x.device)
            else:
                scale = ((hi - lo) / (qmax - qmin)).clamp(min=1e-8)
                zp = torch.clamp(torch.round(-lo / scale), qmin, qmax).to(torch.int64)
            q = _QD.quantize_per_tensor.tensor(x, scale, zp, qmin, qmax, dtype)
            return _QD.dequantize_per_tensor.tensor(q, scale, zp, qmin, qmax, dtype)
        if self.input_scale is None:
            return x
        q = _QD.quantize_per_tensor(x, self.input_scale, self.input_zero_point, qmin, qmax, dtype)
        return _QD.dequantize_per_tensor(
            q, self.input_scale, self.input_zero_point, qmin, qmax, dtype
        )

    def quantize_output(self, y: torch.Tensor) -> torch.Tensor:
        """Fake-quantize the layer output when ``output_scale`` is set."""
        if self.output_scale is None:
            return y
        qmin, qmax, dtype = _INPUT_RANGES[self.input_dtype]
        q = _QD.quantize_per_tensor(y, self.output_scale, self.output_zero_point, qmin, qmax, dtype)
        return _QD.dequantize_per_tensor(
            q, self.output_scale, self.output_zero_point, qmin, qmax, dtype
        )

    def load_weight_(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Quantize the float ``weight`` with the stored ``weight_scale`` and copy ``bias``."""
        shape = (-1,) + (1,) * (weight.ndim - 1)
        q = weight.detach().float() / self.weight_scale.reshape(shape).float()
        q.round_().clamp_(self.weight_qmin, self.weight_qmax)  # in place: one float temporary
        self.weight_int8.copy_(q)
        if self.bias is not None and bias is not None:
            with torch.no_grad():
                self.bias.copy_(bias.detach().float())

    def qparams(self) -> LayerQParams:
        """The :class:`LayerQParams` this layer was built with."""
        return LayerQParams(
            weight_scale=self.weight_scale.detach().clone(),
            weight_bits=self.weight_bits,
            input_scale=self.input_scale,
            input_zero_point=self.input_zero_point,
            input_dtype=self.input_dtype,
            input_dynamic=self.input_dynamic,
            output_scale=self.output_scale,
            output_zero_point=self.output_zero_point,
        )

    def _spec_common(self) -> dict[str, Any]:
        return {
            "bias": self.bias is not None,
            "weight_bits": self.weight_bits,
            "input_scale": self.input_scale,
            "input_zero_point": self.input_zero_point,
            "input_dtype": self.input_dtype,
            "input_dynamic": self.input_dynamic,
            "output_scale": self.output_scale,
            "output_zero_point": self.output_zero_point,
        }

    def _repr_q(self) -> str:
        if self.input_dynamic:
            act = f"dynamic {self.input_dtype}"
        elif self.input_scale is None:
            act = "float"
        else:
            act = f"{self.input_dtype}(scale={self.input_scale:.4g}, zp={self.input_zero_point})"
        out = "" if self.output_scale is None else f", y=(scale={self.output_scale:.4g})"
        return f"w=int{self.weight_bits}/channel, x={act}{out}"


class QDQConv2d(_QDQLayer):
    """A Conv2d with int8 (or 4-bit) per-channel weights and optional input quantization.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: As in
            ``nn.Conv2d`` (``padding`` as ints; ``padding_mode`` "zeros" only).
        weight_bits: 8 or 4.
        input_scale: Static input scale (``None``: weight-only unless ``input_dynamic``).
        input_zero_point, input_dtype: Static input zero point and ``"uint8"``/``"int8"``.
        input_dynamic: Compute the input scale from each batch (per tensor).
        output_scale, output_zero_point: Static output quantization (``None``: float output).
        device: Where to allocate.

    Example:
        >>> conv = QDQConv2d.from_float(nn.Conv2d(3, 8, 3), LayerQParams(
        ...     weight_scale=quantize_weight(nn.Conv2d(3, 8, 3).weight)[1], input_scale=0.05))
        >>> conv(torch.randn(1, 3, 8, 8)).shape
        torch.Size([1, 8, 6, 6])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        groups: int = 1,
        bias: bool = True,
        *,
        weight_bits: int = 8,
        input_scale: float | None = None,
        input_zero_point: int = 0,
        input_dtype: str = "uint8",
        input_dynamic: bool = False,
        output_scale: float | None = None,
        output_zero_point: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = tuple(kernel_size)
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self._init_qdq(
            shape, bias, weight_bits, input_scale, input_zero_point, input_dtype,
            input_dynamic, output_scale, output_zero_point, device,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantize_input(x)
        w = self.dequantized_weight()
        y = F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return self.quantize_output(y)

    def spec(self) -> dict[str, Any]:
        """JSON-ready constructor arguments (what the ``quant.qdq`` replay rebuilds)."""
        return {
            "type": "conv2d",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": list(self.padding),
            "dilation": list(self.dilation),
            "groups": self.groups,
            **self._spec_common(),
        }

    @classmethod
    def from_float(cls, conv: nn.Conv2d, qp: LayerQParams) -> QDQConv2d:
        """Build from a float ``nn.Conv2d`` and its :class:`LayerQParams`."""
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(
                f"QDQConv2d needs numeric zero padding, got padding={conv.padding!r}, "
                f"padding_mode={conv.padding_mode!r}; use padding as ints with 'zeros' mode"
            )
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,  # type: ignore[arg-type]
            conv.padding, conv.dilation, conv.groups, conv.bias is not None,  # type: ignore[arg-type]
            weight_bits=qp.weight_bits, input_scale=qp.input_scale,
            input_zero_point=qp.input_zero_point, input_dtype=qp.input_dtype,
            input_dynamic=qp.input_dynamic, output_scale=qp.output_scale,
            output_zero_point=qp.output_zero_point, device=conv.weight.device,
        )  # fmt: skip
        new.weight_scale.copy_(qp.weight_scale.reshape(-1).float())
        if conv.weight.is_contiguous(memory_format=torch.channels_last):  # keep its layout
            new.weight_int8 = new.weight_int8.contiguous(memory_format=torch.channels_last)
        new.load_weight_(conv.weight, conv.bias)
        return new

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, groups={self.groups}, " + self._repr_q()
        )


class QDQLinear(_QDQLayer):
    """A Linear with int8 (or 4-bit) per-channel weights and optional input quantization.

    Args:
        in_features, out_features, bias: As in ``nn.Linear``.
        weight_bits, input_scale, input_zero_point, input_dtype, input_dynamic, output_scale,
            output_zero_point, device: As in :class:`QDQConv2d`.

    Example:
        >>> lin = QDQLinear(16, 4, input_scale=0.1)
        >>> lin(torch.randn(2, 16)).shape
        torch.Size([2, 4])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        weight_bits: int = 8,
        input_scale: float | None = None,
        input_zero_point: int = 0,
        input_dtype: str = "uint8",
        input_dynamic: bool = False,
        output_scale: float | None = None,
        output_zero_point: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_qdq(
            (out_features, in_features), bias, weight_bits, input_scale, input_zero_point,
            input_dtype, input_dynamic, output_scale, output_zero_point, device,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(self.quantize_input(x), self.dequantized_weight(), self.bias)
        return self.quantize_output(y)

    def spec(self) -> dict[str, Any]:
        """JSON-ready constructor arguments (what the ``quant.qdq`` replay rebuilds)."""
        return {
            "type": "linear",
            "in_features": self.in_features,
            "out_features": self.out_features,
            **self._spec_common(),
        }

    @classmethod
    def from_float(cls, linear: nn.Linear, qp: LayerQParams) -> QDQLinear:
        """Build from a float ``nn.Linear`` and its :class:`LayerQParams`."""
        new = cls(
            linear.in_features, linear.out_features, linear.bias is not None,
            weight_bits=qp.weight_bits, input_scale=qp.input_scale,
            input_zero_point=qp.input_zero_point, input_dtype=qp.input_dtype,
            input_dynamic=qp.input_dynamic, output_scale=qp.output_scale,
            output_zero_point=qp.output_zero_point, device=linear.weight.device,
        )  # fmt: skip
        new.weight_scale.copy_(qp.weight_scale.reshape(-1).float())
        new.load_weight_(linear.weight, linear.bias)
        return new

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, " + self._repr_q()


# to_qdq_ and its report live in convert.py; re-exported here, the home of the Q/DQ format
from slimtorch.quant.convert import QuantReport, QuantRow, to_qdq_  # noqa: E402

__all__ = [
    "LayerQParams",
    "QDQConv2d",
    "QDQLinear",
    "QuantReport",
    "QuantRow",
    "fake_quantize",
    "quantize_weight",
    "to_qdq_",
    "weight_range",
]
