"""Direct convolution for few-tap layers, fused with the ReLU and max-pool that follow it.

A convolution whose outputs each read only a few input values (a network's stem: one input
channel and a 3x3 kernel read 9) does almost no arithmetic. Its cost is memory traffic: the
library kernel writes the full-resolution output map, a batch-norm/ReLU pass reads and writes it
again, and the max-pool reads it once more. Written instead as a sum of shifted, strided slices of
the input times per-output-channel weights, the convolution is an elementwise expression that
``torch.compile`` fuses with whatever elementwise work follows it.

With the batch norm folded into the convolution (:func:`~slimtorch.quant.fold_bn_`), a following
``ReLU`` and ``MaxPool2d`` (kernel equal to stride) fold in as well: the block computes the pooled
map directly, as the maximum over the k x k window offsets of the direct convolution evaluated on
the pooled grid, plus the bias, then the ReLU. That is exact: the bias is constant per channel,
so it commutes with the maximum, and ReLU is monotone, so ``relu(max(a)) == max(relu(a))``. One
kernel then writes only the pooled map, 1/k^2 the size of the convolution's output.

Measured (docs/benchmarks.md): vgg11-bn on 28x28 inputs, compiled, H100, fp32, batch 4096: the
dense forward went from 4.81 to 3.59 ms (1.34x) with its stem lowered this way. The lowering only
pays when compiled; run eagerly, every tap is a separate operation and the layer is slower. This
transform does not measure: time the model before and after on the device that will run it
(``slimtorch compress --method direct-conv`` does).

The change is recorded (``"quant.direct_conv"``) so :func:`slimtorch.models.load_model`
rebuilds it; the lowered layer keeps the convolution's ``weight``/``bias`` names, so state dicts
match.

Example:
    >>> net = nn.Sequential(
    ...     nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2)
    ... ).eval()
    >>> x = torch.randn(2, 1, 28, 28)
    >>> with torch.no_grad():
    ...     before = net(x)
    >>> report = lower_direct_conv_(net)
    >>> [(r.conv, r.action, r.taps, r.fused) for r in report.rows]
    [('0', 'direct+pool', 9, ['2', '3'])]
    >>> with torch.no_grad():
    ...     bool(torch.allclose(net(x), before, atol=1e-5)), net(x).shape
    (True, torch.Size([2, 8, 14, 14]))
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Sequence
from glob import escape
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.core.config import Config, check_bool, check_int
from slimtorch.core.globs import check_globs, selected
from slimtorch.core.measure.trace import recording_ops
from slimtorch.core.surgery import fx_graph, own_forward_reason, require_float32, require_values
from slimtorch.models.transforms import ARCH_TRANSFORMS
from slimtorch.prune.buffers import carry_masks_, rerecord_masks_
from slimtorch.quant.fold import fold_bn_
from slimtorch.quant.lowering import (
    LoweringReport,
    as_pair,
    conv_output_size,
    int_padding,
    layer_entries,
    stored_weight_skips,
)

logger = logging.getLogger(__name__)

# one opaque node under torch.fx (see slimtorch.quant.lowering), so models holding these trace
torch.fx.wrap("conv_output_size")

TRANSFORM_NAME = "quant.direct_conv"
"""Architecture-transform name recorded by :func:`lower_direct_conv_`."""


class DirectConv2d(nn.Module):
    """A convolution computed as a sum of strided input slices times weights.

    Optionally followed, inside the same expression, by a max-pool (kernel == stride ==
    ``pool``) and a ReLU, so that a compiler emits one fused kernel that writes only the pooled
    output. Only ``groups == 1`` and zero padding.

    Args:
        weight: ``(C_out, C_in, kh, kw)`` kernel.
        bias: ``(C_out,)`` or None.
        stride, padding, dilation: As for ``nn.Conv2d`` (pairs of ints).
        pool: Max-pool window (and stride) applied to the convolution's output, or None.
        relu: Apply a ReLU last.
        channels_last: Compute in (N, H, W, C) order and return the NCHW-shaped view of that
            (channels-last memory). For consumers that read channels-last, such as the
            im2col of :class:`~slimtorch.quant.gemm.GemmConv2d`: with an NCHW stem, inductor's
            fused stem + im2col kernel and the residual adds that read the stem output gather
            across strides (resnet20, batch 1, one thread: 61 us for the stem kernel).

    Example:
        >>> conv = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        >>> direct = DirectConv2d.from_conv(conv)
        >>> x = torch.randn(2, 1, 9, 9)
        >>> bool(torch.allclose(direct(x), conv(x), atol=1e-6))
        True
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        pool: int | None = None,
        relu: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if weight.dim() != 4:
            raise ValueError(
                f"weight must be (C_out, C_in, kh, kw), got shape {tuple(weight.shape)}"
            )
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        self.bias = (
            None
            if bias is None
            else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        )
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.pool, self.relu, self.channels_last = pool, relu, channels_last
        # plain ints for forward: under torch.fx the weight's shape is symbolic
        self.out_channels, self.in_channels, kh, kw = (int(d) for d in weight.shape)
        self.kernel_size = (kh, kw)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        *,
        pool: int | None = None,
        relu: bool = False,
        channels_last: bool = False,
    ) -> DirectConv2d:
        """The direct form of ``conv`` (see :func:`direct_skip_reason` for what is refused)."""
        reason = direct_skip_reason(conv, max_taps=None)
        if reason:
            raise ValueError(f"cannot lower this Conv2d: {reason}")
        return cls(
            conv.weight,
            conv.bias,
            stride=as_pair(conv.stride),
            padding=as_pair(int_padding(conv)),
            dilation=as_pair(conv.dilation),
            pool=pool,
            relu=relu,
            channels_last=channels_last,
        )

    @property
    def taps(self) -> int:
        """Input values read per output value (``C_in * kh * kw``)."""
        return int(self.weight[0].numel())

    def extra_repr(self) -> str:
        c_out, c_in, kh, kw = self.weight.shape
        return (
            f"{c_in}, {c_out}, kernel_size=({kh}, {kw}), stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, pool={self.pool}, relu={self.relu}"
            + (", channels_last=True" if self.channels_last else "")
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c_out, c_in, (kh, kw) = self.out_channels, self.in_channels, self.kernel_size
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        k = self.pool or 1
        size = conv_output_size(
            x, "DirectConv2d", c_in, (kh, kw), self.stride, self.padding, self.dilation, k
        )
        h_out, w_out = size[0], size[1]
        if recording_ops():  # counted as what it computes: a convolution, then pool and ReLU
            y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
            y = F.max_pool2d(y, k) if self.pool else y
            y = torch.relu(y) if self.relu else y
            return y.contiguous(memory_format=torch.channels_last) if self.channels_last else y
        xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
        weight: torch.Tensor = self.weight
        if self.channels_last:  # taps (N, h, w, 1) times weights along the last dimension
            xp = xp.permute(0, 2, 3, 1)
            # (C_in, kh, kw, C_out): each tap's weights contiguous, so a compiled kernel loads
            # them as one vector (constant-folded when frozen)
            weight = self.weight.permute(1, 2, 3, 0).contiguous()
        step_h, step_w = k * sh, k * sw
        out: torch.Tensor | None = None
        for di in range(k):
            for dj in range(k):
                acc: torch.Tensor | None = None
                for c in range(c_in):
                    for i in range(kh):
                        for j in range(kw):
                            r0, c0 = di * sh + i * dh, dj * sw + j * dw
                            rows = slice(r0, r0 + (h_out - 1) * step_h + 1, step_h)
                            cols = slice(c0, c0 + (w_out - 1) * step_w + 1, step_w)
                            if self.channels_last:  # (N, h, w, c_out)
                                term = xp[:, rows, cols, c : c + 1] * weight[c, i, j]
                            else:
                                w = weight[:, c, i, j].view(1, c_out, 1, 1)
                                term = xp[:, c : c + 1, rows, cols] * w
                            acc = term if acc is None else acc + term
                assert acc is not None
                out = acc if out is None else torch.maximum(out, acc)
        assert out is not None
        if self.bias is not None:
            out = out + (self.bias if self.channels_last else self.bias.view(1, c_out, 1, 1))
        out = torch.relu(out) if self.relu else out
        return out.permute(0, 3, 1, 2) if self.channels_last else out


def direct_skip_reason(
    conv: nn.Module, *, max_taps: int | None, max_in_channels: int | None = None
) -> str | None:
    """Why ``conv`` cannot (or should not) become a :class:`DirectConv2d`, or None."""
    if not isinstance(conv, nn.Conv2d):
        return f"{type(conv).__name__} is not a Conv2d"
    if (own := own_forward_reason(conv)) is not None:
        return own
    if conv.groups != 1:
        return f"groups={conv.groups}; only groups=1 is lowered"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}; only zero padding is lowered"
    if conv.padding == "same":
        return "padding='same'; give explicit padding to lower this layer"
    if max_in_channels is not None and conv.in_channels > max_in_channels:
        return (
            f"{conv.in_channels} input channels > max_in_channels={max_in_channels}; a library "
            "kernel is the better fit"
        )
    taps = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    if max_taps is not None and taps > max_taps:
        return f"{taps} taps per output > max_taps={max_taps}; a library kernel is the better fit"
    if not bool(torch.isfinite(conv.weight).all()):
        return "weights hold NaN/Inf; fix the layer first"
    return None


@dataclasses.dataclass(frozen=True, kw_only=True)
class DirectConvConfig(Config):
    """Which convolutions :func:`lower_direct_conv_` lowers, and what it fuses into them.

    Attributes:
        max_taps: Lower a convolution only if each output reads at most this many inputs
            (``C_in * kh * kw``); 27 covers 3x3 stems on up to three input channels.
        max_in_channels: ... and only if it has at most this many input channels (4: grey,
            RGB and RGBA stems; a 1x1 convolution over 16 channels has few taps too, but it is
            a matrix product that the library kernels do well).
        fold_bn: Fold a batch norm that follows a lowered convolution into it first (needed
            for the pool fusion; exact in eval mode, see :func:`~slimtorch.quant.fold_bn_`).
        fuse_pool: Fuse a following ``ReLU`` and ``MaxPool2d`` (kernel == stride, no padding,
            dilation 1, floor mode) into the lowered layer.
        channels_last: Lowered layers compute and store channels-last (see
            :class:`DirectConv2d`); for models whose other convolutions are
            :func:`~slimtorch.quant.lower_conv_gemm_` layers.
    """

    max_taps: int = 27
    max_in_channels: int = 4
    fold_bn: bool = True
    fuse_pool: bool = True
    channels_last: bool = False

    def __post_init__(self) -> None:
        check_int(self, "max_taps", self.max_taps, low=1, high=4096)
        check_int(self, "max_in_channels", self.max_in_channels, low=1, high=4096)
        for name in ("fold_bn", "fuse_pool", "channels_last"):
            check_bool(self, name, getattr(self, name))


@dataclasses.dataclass
class DirectRow:
    """One convolution: what happened and why."""

    conv: str
    action: str
    taps: int
    fused: list[str] = dataclasses.field(default_factory=list)
    reason: str | None = None

    HEADER: ClassVar[tuple[str, ...]] = ("conv", "taps", "action", "fused", "reason")

    def cells(self) -> tuple[str, ...]:
        """This row's :attr:`HEADER` columns as text."""
        return (self.conv, str(self.taps), self.action, ",".join(self.fused), self.reason or "")


@dataclasses.dataclass
class DirectReport(LoweringReport[DirectRow]):
    """What :func:`lower_direct_conv_` did (see :class:`LoweringReport`)."""

    method: ClassVar[str] = "direct_conv"


def _trace(model: nn.Module) -> torch.fx.Graph:
    try:
        return fx_graph(model)
    except Exception as exc:  # fx raises many error types on untraceable code
        raise TypeError(
            f"{type(model).__name__} cannot be traced by torch.fx ({type(exc).__name__}: {exc}); "
            "lower its layers by hand with DirectConv2d.from_conv"
        ) from None


def _pool_chain(
    node: torch.fx.Node, modules: dict[str, nn.Module], calls: Counter[str]
) -> tuple[str | None, str | None, str | None]:
    """``(relu_name, pool_name, why_not)`` for the modules that follow a conv node."""
    nxt = _sole_module_user(node, modules, calls)
    relu_name = None
    if nxt is not None and type(modules[nxt[1]]) is nn.ReLU:
        relu_name, node = nxt[1], nxt[0]
        nxt = _sole_module_user(node, modules, calls)
    if nxt is None or not isinstance(modules[nxt[1]], nn.MaxPool2d):
        return None, None, "no MaxPool2d module (called once) follows"
    pool = modules[nxt[1]]
    assert isinstance(pool, nn.MaxPool2d)
    k, stride = as_pair(pool.kernel_size), as_pair(pool.stride or pool.kernel_size)
    if k[0] != k[1] or k != stride or as_pair(pool.padding) != (0, 0):
        return None, None, "its MaxPool2d is not square with kernel == stride and no padding"
    if as_pair(pool.dilation) != (1, 1) or pool.ceil_mode or pool.return_indices:
        return None, None, "its MaxPool2d uses dilation, ceil_mode or return_indices"
    return relu_name, nxt[1], None


def _sole_module_user(
    node: torch.fx.Node, modules: dict[str, nn.Module], calls: Counter[str]
) -> tuple[torch.fx.Node, str] | None:
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if user.op != "call_module" or calls[str(user.target)] != 1:
        return None
    return user, str(user.target)


def lower_direct_conv_(
    model: nn.Module,
    config: DirectConvConfig | None = None,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    strict: bool = False,
) -> DirectReport:
    """Replace few-tap convolutions by :class:`DirectConv2d`, fusing a following ReLU/max-pool.

    Args:
        model: The model, changed in place (put it in eval mode: batch norms are folded).
        config: What to lower and fuse (defaults: :class:`DirectConvConfig`).
        include: Globs of conv names to consider (all when ``None``).
        exclude: Globs of conv names to leave alone.
        strict: Raise :class:`~slimtorch.core.errors.TransformSkipError` (model unchanged) when
            a considered convolution is skipped.

    Returns:
        A :class:`DirectReport`: per convolution ``direct``, ``direct+pool`` or ``skipped`` with
        the reason, the fused module names (now ``nn.Identity``) and the folded batch norms.

    Raises:
        TypeError: ``model`` is not a module or cannot be traced by ``torch.fx``.
        ValueError: an ``include``/``exclude`` glob matches no module.

    Example:
        >>> from slimtorch.models import create_model
        >>> vgg = create_model("vgg11-bn", in_channels=1, input_size=28).eval()
        >>> rows = lower_direct_conv_(vgg).rows
        >>> [(r.conv, r.action) for r in rows if r.action != "skipped"]
        [('features.0', 'direct+pool')]
    """
    require_values(model, "lower_direct_conv_")
    check_bool("lower_direct_conv_", "strict", strict)
    require_float32(model, "lower_direct_conv_", "lower the float32 model", also=(torch.float64,))
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    config = config or DirectConvConfig()
    check_globs(model, include, exclude, "lower_direct_conv_")
    modules = dict(model.named_modules())
    rows: dict[str, DirectRow] = {}
    for name, mod in modules.items():
        if isinstance(mod, nn.Conv2d) and selected(name, include, exclude):
            taps = mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]
            reason = direct_skip_reason(
                mod, max_taps=config.max_taps, max_in_channels=config.max_in_channels
            )
            rows[name] = DirectRow(name, "skipped" if reason else "direct", taps, reason=reason)
    for name, stored in stored_weight_skips(model, include, exclude):
        rows[name] = DirectRow(name, "skipped", 0, reason=stored)
    graph = _trace(model)
    calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
    for name, row in rows.items():
        if row.reason is None and calls[name] != 1:
            row.action = "skipped"
            row.reason = (
                f"the conv is called {calls[name]} times in forward; it must be called once"
            )
    candidates = [n for n, r in rows.items() if r.reason is None]
    DirectReport(rows=list(rows.values())).check_strict(strict, "lower_direct_conv_")
    folded: list[str] = []
    if config.fold_bn and candidates:
        folded = [r.bn for r in fold_bn_(model, include=[escape(n) for n in candidates]).folded]
        modules = dict(model.named_modules())
        graph = _trace(model)
        calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
    nodes = {str(n.target): n for n in graph.nodes if n.op == "call_module"}
    layers: list[dict[str, Any]] = []
    moved: dict[str, str] = {}
    for name in candidates:
        row, node = rows[name], nodes[name]
        relu_name = pool_name = None
        if config.fuse_pool:
            relu_name, pool_name, why = _pool_chain(_skip_identity(node, modules), modules, calls)
            if why:
                row.reason = f"not fused: {why}"
        conv = modules[name]
        assert isinstance(conv, nn.Conv2d)
        pool = _pool_size(modules[pool_name]) if pool_name else None
        layer = {"conv": name, "pool": pool, "relu": relu_name, "pool_module": pool_name}
        if config.channels_last:
            layer["channels_last"] = True
        if _apply(model, conv, layer):
            moved[name] = name
        row.action = "direct+pool" if pool else "direct"
        row.fused = [n for n in (relu_name, pool_name) if n]
        layers.append(layer)
    report = DirectReport(rows=list(rows.values()), folded=folded)
    if layers:
        report.record(model, TRANSFORM_NAME, {"layers": layers})
        rerecord_masks_(model, moved)
    logger.info("lower_direct_conv_: lowered %d of %d conv(s)", len(layers), len(rows))
    return report


def _pool_size(pool: nn.Module) -> int:
    assert isinstance(pool, nn.MaxPool2d)
    return as_pair(pool.kernel_size)[0]


def _skip_identity(node: torch.fx.Node, modules: dict[str, nn.Module]) -> torch.fx.Node:
    """Step over the ``nn.Identity`` a folded batch norm left behind."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op != "call_module" or not isinstance(modules.get(str(user.target)), nn.Identity):
            break
        node = user
    return node


def _apply(model: nn.Module, conv: nn.Conv2d, layer: dict[str, Any], carry: bool = True) -> bool:
    """Swap in the direct form; returns whether it carried pruning masks (``carry``: not in a
    load's replay, where the masks' own record, replayed after, puts them back)."""
    direct = DirectConv2d.from_conv(
        conv,
        pool=layer["pool"],
        relu=layer["relu"] is not None,
        channels_last=bool(layer.get("channels_last", False)),
    ).train(conv.training)
    carried = carry and carry_masks_(conv, direct)
    model.set_submodule(layer["conv"], direct)
    for name in (layer["relu"], layer["pool_module"]):
        if name:
            model.set_submodule(name, nn.Identity())
    return carried


def _replay(model: nn.Module, params: dict[str, Any]) -> None:
    for layer in layer_entries(params, TRANSFORM_NAME, {"conv", "pool", "relu", "pool_module"}):
        conv = model.get_submodule(layer["conv"])
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"{layer['conv']!r} is a {type(conv).__name__}, expected a Conv2d")
        _apply(model, conv, layer, carry=False)


if TRANSFORM_NAME not in ARCH_TRANSFORMS:
    ARCH_TRANSFORMS.add(TRANSFORM_NAME, _replay)
