"""Convolutions as one patch copy and one matrix product, for small-batch compiled CPU inference.

At batch 1 a small CNN on the CPU is bound by per-call cost, not arithmetic: inductor sends every
convolution, fp32 or int8, to a oneDNN call that spends about 25 us before its kernel runs
(docs/benchmarks.md, "Static int8 PTQ"). Inductor has no convolution template of its own, but
with ``max_autotune`` it has C++ GEMM templates (AVX-512 for fp32; AMX/VNNI for int8, with the
zero-point compensation, bias, ReLU and requantization fused in) that it generates into the
model's own code. :class:`GemmConv2d` rewrites a convolution as an explicit im2col (a padded
channels-last map read through ``as_strided``: one copy kernel) followed by an ``nn.Linear``, so
those templates run it.

For static int8 (the linear replaced by a :class:`~slimtorch.quant.QDQLinear` by
:func:`~slimtorch.quant.quantize_`) the input is quantized once, on the map, and the patches are
copied as uint8 with the padding set to the zero point, which dequantizes to exactly zero: the
same numbers as quantizing the patches, at a ninth of the quantize work for a 3x3 kernel.
Quantizing after the copy instead was measured 1.3x slower at batch 1.

Measured (docs/benchmarks.md): trained resnet20 on Fashion-MNIST, stem lowered with
:func:`~slimtorch.quant.lower_direct_conv_` (channels-last), the other 20 convolutions lowered
here, one pinned thread of an AVX-512/AMX Xeon, compiled with ``max_autotune``: int8 at batch 1
runs 2.4x faster than the same rewritten fp32 model (0.92 -> 0.39 ms; 1.15x with
convolutions); on an AMD EPYC (Zen 5: AVX-512 VNNI, no AMX), where the GEMM template uses its
VNNI micro-kernel, 2.2x (0.86 -> 0.39 ms). At batch 32 the rewritten int8 model is 2x slower
than int8 convolutions on the Xeon (7.6 against 3.8 ms), so it is a batch-1 deployment
choice: measure the batch you will serve (``scripts/bench_quant.py --gemm-layout``,
``slimtorch compress --method conv-gemm``).

The change is recorded (``"quant.conv_gemm"``) so :func:`slimtorch.models.load_model` rebuilds
it; run it before :func:`~slimtorch.quant.quantize_` (which then quantizes the linears) and after
any batch-norm folding (it folds a following batch norm itself by default). The rewrite is for
inductor: ONNX has no strided view, and :func:`~slimtorch.quant.export_onnx` refuses it.

Example:
    >>> net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()).eval()
    >>> x = torch.randn(2, 8, 10, 10)
    >>> with torch.no_grad():
    ...     before = net(x)
    >>> report = lower_conv_gemm_(net)
    >>> [(r.conv, r.action, r.k) for r in report.rows], report.folded
    ([('0', 'gemm', 72)], ['1'])
    >>> with torch.no_grad():
    ...     bool(torch.allclose(net(x), before, atol=1e-5))
    True
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from glob import escape
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.core.config import Config, check_bool, check_int
from slimtorch.core.devices import keeps_rng
from slimtorch.core.globs import check_globs, selected
from slimtorch.core.surgery import carry_frozen, require_float32, require_values
from slimtorch.models.transforms import ARCH_TRANSFORMS
from slimtorch.prune.buffers import carry_masks_, rerecord_masks_
from slimtorch.quant.fold import fold_bn_
from slimtorch.quant.lowering import (
    LoweringReport,
    as_pair,
    conv_output_size,
    int_padding,
    stored_weight_skips,
)
from slimtorch.quant.qdq import _INPUT_RANGES, _QD, QDQLinear

logger = logging.getLogger(__name__)

TRANSFORM_NAME = "quant.conv_gemm"
"""Architecture-transform name recorded by :func:`lower_conv_gemm_`."""


def _gemm_layout(weight: torch.Tensor) -> torch.Tensor:
    """A conv weight ``(O, C, kh, kw)`` as the GEMM's ``(O, kh * kw * C)`` matrix."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


class GemmConv2d(nn.Module):
    """A ``Conv2d`` (groups 1, zero padding) as im2col + ``nn.Linear``, NCHW in and out.

    The linear's features are ordered (kh, kw, C_in) to match channels-last patches; its output
    ``(N*Ho*Wo, C_out)`` is returned as an NCHW view of a channels-last result. Any input size
    works (the geometry is read from the input).

    Args:
        in_channels: Input channels.
        linear: ``nn.Linear(in_channels * kh * kw, C_out)`` (or its Q/DQ form).
        kernel_size, stride, padding, dilation: As for ``nn.Conv2d`` (pairs of ints).

    Example:
        >>> conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2)
        >>> gemm = GemmConv2d.from_conv(conv)
        >>> x = torch.randn(2, 4, 11, 11)
        >>> bool(torch.allclose(gemm(x), conv(x), atol=1e-5))
        True
    """

    def __init__(
        self,
        in_channels: int,
        linear: nn.Module,
        *,
        kernel_size: tuple[int, int],
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] = (0, 0),
        dilation: tuple[int, int] = (1, 1),
    ) -> None:
        super().__init__()
        k = in_channels * kernel_size[0] * kernel_size[1]
        features = getattr(linear, "in_features", None)
        if features != k:
            raise ValueError(
                f"linear must take in_channels * kh * kw = {k} features, got {features}"
            )
        self.in_channels = in_channels
        self.linear = linear
        self.kernel_size, self.stride = kernel_size, stride
        self.padding, self.dilation = padding, dilation

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> GemmConv2d:
        """The GEMM form of ``conv`` (see :func:`gemm_skip_reason` for what is refused)."""
        reason = gemm_skip_reason(conv)
        if reason:
            raise ValueError(f"cannot lower this Conv2d: {reason}")
        c_out, c_in, kh, kw = conv.weight.shape
        w = conv.weight
        linear = nn.Linear(
            c_in * kh * kw, c_out, bias=conv.bias is not None, device=w.device, dtype=w.dtype
        )
        with torch.no_grad():
            linear.weight.copy_(_gemm_layout(conv.weight))
            if conv.bias is not None and linear.bias is not None:
                linear.bias.copy_(conv.bias)
        carry_frozen(conv, linear)
        return cls(
            c_in,
            linear,
            kernel_size=(kh, kw),
            stride=as_pair(conv.stride),
            padding=as_pair(int_padding(conv)),
            dilation=as_pair(conv.dilation),
        ).train(conv.training)

    @property
    def out_channels(self) -> int:
        """Output channels (the linear's ``out_features``)."""
        features = self.linear.out_features
        assert isinstance(features, int)
        return features

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}"
        )

    def _patches(self, x: torch.Tensor, h_out: int, w_out: int, pad: float) -> torch.Tensor:
        """``(N*Ho*Wo, kh*kw*C_in)`` patches, padding filled with ``pad``."""
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        (ph, pw), (dh, dw) = self.padding, self.dilation
        nhwc = x.permute(0, 2, 3, 1)
        if ph or pw:
            nhwc = F.pad(nhwc, (0, 0, pw, pw, ph, ph), value=pad)
        # a fresh contiguous map: the compiler realizes it, so the strided read below is a
        # plain copy instead of a pad/quantize expression recomputed kh*kw times per element
        nhwc = nhwc.contiguous()
        n, hp, wp, c = nhwc.shape[0], nhwc.shape[1], nhwc.shape[2], nhwc.shape[3]
        view = nhwc.as_strided(
            (n, h_out, w_out, kh, kw, c),
            (hp * wp * c, sh * wp * c, sw * c, dh * wp * c, dw * c, 1),
        )
        return view.reshape(n * h_out * w_out, kh * kw * c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = conv_output_size(
            x, "GemmConv2d", self.in_channels, self.kernel_size, self.stride, self.padding,
            self.dilation,
        )  # fmt: skip
        h_out, w_out = size[0], size[1]
        lin = self.linear
        if isinstance(lin, QDQLinear) and lin.input_scale is not None and not lin.input_dynamic:
            qmin, qmax, dtype = _INPUT_RANGES[lin.input_dtype]
            scale, zp = lin.input_scale, lin.input_zero_point
            q = _QD.quantize_per_tensor(x, scale, zp, qmin, qmax, dtype)
            if torch.compiler.is_compiling():
                # the pattern inductor turns into an int8 GEMM: integer patches, then the
                # dequantize that feeds the linear
                patches = _QD.dequantize_per_tensor(
                    self._patches(q, h_out, w_out, zp), scale, zp, qmin, qmax, dtype
                )
            else:
                # the same values, dequantized before the kh*kw-fold copy instead of after it
                # (the zero point pads to exactly 0.0)
                deq = _QD.dequantize_per_tensor(q, scale, zp, qmin, qmax, dtype)
                patches = self._patches(deq, h_out, w_out, 0.0)
            y = lin.quantize_output(F.linear(patches, lin.dequantized_weight(), lin.bias))
        else:
            y = lin(self._patches(x, h_out, w_out, 0.0))
        if isinstance(h_out, int) and h_out == w_out == 1:
            # a 1x1 map is laid out alike either way; without the permute, inductor's int8
            # GEMM template does not try to fuse a 4-D view into its 2-D epilogue (which
            # fails to compile: vgg11-bn's last convolution on 28x28 inputs)
            return y.view(x.shape[0], -1, 1, 1)
        return y.view(x.shape[0], h_out, w_out, -1).permute(0, 3, 1, 2)


# see conv_output_size: one opaque node under torch.fx, so models holding GemmConv2d trace
torch.fx.wrap("conv_output_size")


def gemm_skip_reason(conv: nn.Module) -> str | None:
    """Why ``conv`` cannot become a :class:`GemmConv2d`, or None."""
    if not isinstance(conv, nn.Conv2d):
        return f"{type(conv).__name__} is not a Conv2d"
    if any(
        getattr(type(conv), f) is not getattr(nn.Conv2d, f) for f in ("forward", "_conv_forward")
    ):
        return f"{type(conv).__name__} subclasses Conv2d with a forward of its own; kept as it is"
    if conv.groups != 1:
        return f"groups={conv.groups}; only groups=1 is lowered (depthwise has no GEMM to gain)"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}; only zero padding is lowered"
    if conv.padding == "same":
        return "padding='same'; give explicit padding to lower this layer"
    if not bool(torch.isfinite(conv.weight).all()):
        return "weights hold NaN/Inf; fix the layer first"
    return None


@dataclasses.dataclass(frozen=True, kw_only=True)
class GemmConvConfig(Config):
    """Which convolutions :func:`lower_conv_gemm_` lowers.

    Attributes:
        min_k: Lower a convolution only if its patch length ``C_in * kh * kw`` is at least
            this (default 16: a 3x3 stem on one to three channels gives the templates too
            short a reduction; lower it with :func:`~slimtorch.quant.lower_direct_conv_`).
        fold_bn: Fold a batch norm that follows a lowered convolution into it first (exact in
            eval mode; the linear then carries the folded bias).
    """

    min_k: int = 16
    fold_bn: bool = True

    def __post_init__(self) -> None:
        check_int(self, "min_k", self.min_k, low=1, high=1 << 20)
        check_bool(self, "fold_bn", self.fold_bn)


@dataclasses.dataclass
class GemmRow:
    """One convolution: what happened and why."""

    conv: str
    action: str
    k: int
    reason: str | None = None

    HEADER: ClassVar[tuple[str, ...]] = ("conv", "k", "action", "reason")

    def cells(self) -> tuple[str, ...]:
        """This row's :attr:`HEADER` columns as text."""
        return (self.conv, str(self.k), self.action, self.reason or "")


@dataclasses.dataclass
class GemmReport(LoweringReport[GemmRow]):
    """What :func:`lower_conv_gemm_` did (see :class:`~slimtorch.quant.direct.LoweringReport`)."""

    method: ClassVar[str] = "conv_gemm"


@keeps_rng  # the GEMM layers' own initial weights are overwritten
def lower_conv_gemm_(
    model: nn.Module,
    config: GemmConvConfig | None = None,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    strict: bool = False,
) -> GemmReport:
    """Replace convolutions by :class:`GemmConv2d` (im2col + linear), in place.

    Args:
        model: The model (eval mode when batch norms are folded).
        config: What to lower (defaults: :class:`GemmConvConfig`).
        include: Globs of conv names to consider (all when ``None``).
        exclude: Globs of conv names to leave alone.
        strict: Raise :class:`~slimtorch.core.errors.TransformSkipError` (model unchanged) when
            a considered convolution is skipped.

    Returns:
        A :class:`GemmReport`: per convolution ``gemm`` or ``skipped`` with the reason, and the
        folded batch norms.

    Raises:
        TypeError: ``model`` is not a module.
        ValueError: an ``include``/``exclude`` glob matches no module.

    Example:
        >>> from slimtorch.models import create_model
        >>> net = create_model("resnet20", in_channels=1, input_size=28).eval()
        >>> report = lower_conv_gemm_(net)
        >>> len(report.lowered), [(r.conv, r.reason) for r in report.rows if r.reason]
        (20, [('conv1', 'patch length 9 < min_k=16; lower it with lower_direct_conv_')])
    """
    require_values(model, "lower_conv_gemm_")
    check_bool("lower_conv_gemm_", "strict", strict)
    require_float32(model, "lower_conv_gemm_", "lower the float32 model", also=(torch.float64,))
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    config = config or GemmConvConfig()
    check_globs(model, include, exclude, "lower_conv_gemm_")
    rows: list[GemmRow] = []
    for name, mod in model.named_modules():
        if not (isinstance(mod, nn.Conv2d) and selected(name, include, exclude)):
            continue
        k = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        reason = gemm_skip_reason(mod)
        if reason is None and k < config.min_k:
            reason = f"patch length {k} < min_k={config.min_k}; lower it with lower_direct_conv_"
        rows.append(GemmRow(name, "skipped" if reason else "gemm", k, reason))
    rows += [
        GemmRow(name, "skipped", 0, why)
        for name, why in stored_weight_skips(model, include, exclude)
    ]
    GemmReport(rows=rows).check_strict(strict, "lower_conv_gemm_")
    names = [r.conv for r in rows if r.action == "gemm"]
    folded: list[str] = []
    if config.fold_bn and names:
        folded = [r.bn for r in fold_bn_(model, include=[escape(n) for n in names]).folded]
    moved: dict[str, str] = {}
    for name in names:
        conv = model.get_submodule(name)
        assert isinstance(conv, nn.Conv2d)
        gemm = GemmConv2d.from_conv(conv)
        if carry_masks_(conv, gemm.linear, _gemm_layout):
            moved[name] = f"{name}.linear"
        model.set_submodule(name, gemm)
    report = GemmReport(rows=rows, folded=folded)
    if names:
        report.record(model, TRANSFORM_NAME, {"convs": names})
        rerecord_masks_(model, moved)
    logger.info("lower_conv_gemm_: lowered %d of %d conv(s)", len(names), len(rows))
    return report


def _replay(model: nn.Module, params: dict[str, Any]) -> None:
    convs = params.get("convs")
    if not isinstance(convs, list) or not all(isinstance(c, str) for c in convs):
        raise ValueError(f"{TRANSFORM_NAME} params need a 'convs' list of names, got {params!r}")
    for name in convs:
        conv = model.get_submodule(name)
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"{name!r} is a {type(conv).__name__}, expected a Conv2d")
        model.set_submodule(name, GemmConv2d.from_conv(conv))


if TRANSFORM_NAME not in ARCH_TRANSFORMS:
    ARCH_TRANSFORMS.add(TRANSFORM_NAME, _replay)
